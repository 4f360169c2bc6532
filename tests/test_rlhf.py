"""The rlhf baseline: human comparisons in three forms -> a PM -> PPO or DPO, end to end on the tiny model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import tiny_run_overrides

from cai.config import RLHFConfig, RunConfig
from cai.config_loader import load_config
from cai.data.comparisons import read_comparisons
from cai.data.gold import load_gold_pairs
from cai.errors import CaiError
from cai.eval.evaluate import eval_models
from cai.io import read_jsonl
from cai.pipeline import check_inputs
from cai.train import rlhf
from cai.train.pm import pairs_from_human_comparisons

DATA = Path(__file__).parent / "data"
HH = DATA / "hh_rlhf_comparisons.jsonl"
"""hh-rlhf rows: multi-turn transcripts that share all but the last answer; rows 1 and 2 judge one conversation."""
PROMPTED = DATA / "prompt_chosen_rejected.jsonl"
"""prompt/chosen/rejected rows: prompts as text, as messages and as a transcript; answers as text and as messages."""

FAST = ["pm.epochs=1", "pm.batch_size=4", "pm.learning_rate=0.001", "pm.eval_fraction=0.25",
        "rl.ppo.steps=2", "rl.ppo.rollout_batch=4", "rl.ppo.minibatch=2", "rl.ppo.epochs=1",
        "rl.ppo.sampling.max_new_tokens=6", "rl.ppo.prompts.limit=8", "rl.ppo.helpfulness.limit=4",
        "rl.ppo.eval_prompts.limit=2", "rl.ppo.eval_every=1", "rl.ppo.save_every=1",
        "rl.dpo.max_length=128", "rl.dpo.learning_rate=0.001", "baselines=[rlhf]"]


def _cfg(tiny_model_dir, small_constitution, tmp_path, *extra) -> RunConfig:
    overrides = tiny_run_overrides(tiny_model_dir, tmp_path / "runs", small_constitution)
    return load_config(RunConfig, None, [*overrides, *FAST, *extra])


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _transcript(*turns: str) -> str:
    return "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {t}" for i, t in enumerate(turns))


def test_hh_rlhf_transcripts_become_pairs_on_their_shared_conversation():
    pairs = pairs_from_human_comparisons(str(HH))
    assert len(pairs) == 8 and all(p.p_a == 1.0 and p.kind == "helpfulness" for p in pairs)
    first = pairs[0]
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user"]  # every turn but the last answer
    assert first.response_a.startswith("Then that one is best") and first.response_b == "Any window works, plants are plants."
    # Two comparisons of one conversation share a group, so the PM's split never puts it on both sides.
    assert pairs[0].group == pairs[1].group and len({p.group for p in pairs}) == 7


def test_prompt_chosen_rejected_rows_read_as_text_messages_or_a_transcript_prompt():
    pairs = pairs_from_human_comparisons(str(PROMPTED), "harmlessness")
    assert len(pairs) == 6 and {p.kind for p in pairs} == {"harmlessness"}
    assert all(len(p.prompt) == 1 and p.prompt[0]["role"] == "user" for p in pairs)
    assert pairs[1].prompt[0]["content"] == "What can I do if I can't sleep?" and pairs[1].response_b == "Take a lot of pills."
    # A transcript prompt ending in an empty "Assistant:" turn: the answers go there, their spaces trimmed.
    assert pairs[3].prompt == [{"role": "user", "content": "Is it safe to mix bleach and vinegar for cleaning?"}]
    assert pairs[3].response_a.startswith("No. Mixing them") and pairs[3].response_b == "Yes, it makes a stronger cleaner."


def test_gold_dev_gives_the_helpfulness_pairs_for_helpful_and_every_pair_for_helpful_harmless():
    dev = load_gold_pairs("gold", "dev")
    n_helpful = sum(g.axis == "helpfulness" for g in dev)
    helpful = rlhf.rlhf_pairs(RLHFConfig(variant="helpful", helpful_data="gold:dev", harmless_data="gold:dev"))
    both = rlhf.rlhf_pairs(RLHFConfig(variant="helpful-harmless", helpful_data="gold:dev", harmless_data="gold:dev"))
    assert 0 < n_helpful < len(dev)
    assert len(helpful) == n_helpful and {p.kind for p in helpful} == {"helpfulness"}
    assert len(both) == len(dev) and sum(p.kind == "harmlessness" for p in both) == len(dev) - n_helpful
    assert [p.response_a for p in both if p.kind == "helpfulness"] == [p.response_a for p in helpful]
    assert all(p.p_a == 1.0 for p in both)


def test_transcripts_that_do_not_share_their_conversation_are_named_by_row(tmp_path):
    good = {"chosen": _transcript("Hi", "Hello!", "Any tips for a first 5k?", "Start slow."),
            "rejected": _transcript("Hi", "Hello!", "Any tips for a first 5k?", "Sprint the start.")}
    bad = {"chosen": _transcript("Hi", "Hello!", "Any tips for a first 5k?", "Start slow."),
           "rejected": _transcript("Hi", "Hello!", "How do I bake bread?", "Knead it well.")}
    path = _write(tmp_path / "pairs.jsonl", [good, bad])
    with pytest.raises(CaiError) as err:
        pairs_from_human_comparisons(str(path))
    message = str(err.value)
    assert message.startswith(f"{path} line 2:") and "differ at turn 3" in message
    assert "\n" not in message and message.count(". ") == 0  # one sentence


@pytest.mark.parametrize("row, words", [
    ({"chosen": "\n\nHuman: hi\n\nAssistant: hello"}, "needs 'chosen' and 'rejected'"),
    ({"chosen": "just an answer", "rejected": "another answer"}, "is not an hh-rlhf transcript"),
    ({"prompt": "hi", "chosen": 3, "rejected": "hello"}, "'chosen' holds int 3; expected text"),
    ({"prompt": [{"role": "robot", "content": "hi"}], "chosen": "a", "rejected": "b"}, "'prompt' must be text or a list"),
    ({"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi"}, "ends with the assistant's answer"),
])
def test_a_malformed_row_is_one_sentence_naming_its_row(tmp_path, row, words):
    good = {"prompt": "hi", "chosen": "hello", "rejected": "go away"}
    path = _write(tmp_path / "pairs.jsonl", [good, good, row])
    with pytest.raises(CaiError, match=words) as err:
        read_comparisons(str(path), "helpfulness")
    assert str(err.value).startswith(f"{path} line 3") and "\n" not in str(err.value)


def test_a_source_the_variant_needs_must_be_named_and_gold_needs_a_split():
    with pytest.raises(CaiError, match="rlhf.harmless_data is null"):
        rlhf.rlhf_pairs(RLHFConfig(variant="helpful-harmless", harmless_data=None))
    assert rlhf.rlhf_pairs(RLHFConfig(variant="helpful", harmless_data=None))  # helpful-only never reads it
    with pytest.raises(CaiError, match="gold:dev or gold:test"):
        read_comparisons("gold", "helpfulness")
    with pytest.raises(CaiError, match="split 'train' is unknown"):
        read_comparisons("gold:train", "helpfulness")


def test_check_inputs_reads_the_rlhf_comparisons_only_when_the_baseline_runs(tiny_model_dir, small_constitution,
                                                                            tmp_path):
    bad = _write(tmp_path / "bad.jsonl", [{"chosen": "no transcript here", "rejected": "nor here"}])
    check_inputs(_cfg(tiny_model_dir, small_constitution, tmp_path, "baselines=[]", f"rlhf.helpful_data={bad}"))
    with pytest.raises(CaiError, match="line 1: 'chosen' is not an hh-rlhf transcript"):
        check_inputs(_cfg(tiny_model_dir, small_constitution, tmp_path, f"rlhf.helpful_data={bad}"))


def test_rlhf_ppo_trains_a_human_label_pm_then_ppo_and_a_rerun_keeps_the_pm(tiny_model_dir, small_constitution,
                                                                            tmp_path, monkeypatch, capsys):
    cfg = _cfg(tiny_model_dir, small_constitution, tmp_path, f"rlhf.helpful_data={HH}",
               f"rlhf.harmless_data={PROMPTED}", "rlhf.variant=helpful-harmless", "rlhf.algo=ppo")
    folder = cfg.run_dir / "rlhf"

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # killed once the PM is saved, before PPO finishes

    monkeypatch.setattr(rlhf, "train_ppo", crash)
    with pytest.raises(KeyboardInterrupt):
        rlhf.run_rlhf(cfg, show_progress=False)
    assert (folder / "pm" / "finished.json").is_file() and (folder / "pm" / "model.safetensors").is_file()
    assert json.loads((folder / "manifest.json").read_text())["status"] == "running"
    assert "rlhf" not in eval_models(cfg)

    def no_second_pm(*args, **kwargs):
        raise AssertionError("the finished PM was trained again")

    monkeypatch.undo()
    monkeypatch.setattr(rlhf, "train_preference_model", no_second_pm)
    capsys.readouterr()
    rlhf.run_rlhf(cfg, show_progress=False)
    err = capsys.readouterr().err
    assert "keeping the preference model" in err and "rlhf: held-out PM reward" in err

    manifest = json.loads((folder / "manifest.json").read_text())
    counts = manifest["counts"]
    assert manifest["status"] == "done" and manifest["attempts"] == 2
    assert (counts["variant"], counts["algo"], counts["policy"]) == ("helpful-harmless", "ppo", "base")
    assert (counts["helpfulness_pairs"], counts["harmlessness_pairs"]) == (8, 6)
    assert counts["train_pairs"] + counts["eval_pairs"] == 14 and counts["eval_pairs"] > 0
    n = counts["pm_eval_accuracy_n"]
    assert n == counts["eval_pairs"] and 0 <= counts["pm_eval_accuracy_ci"][0] <= counts["pm_eval_accuracy"] <= 1
    assert counts["steps"] == 2 and math.isfinite(counts["eval_reward_start"]) and math.isfinite(counts["eval_reward_end"])
    assert [r["step"] for r in read_jsonl(folder / "train_log.jsonl") if "kl" in r] == [1, 2]
    # The policy sits at the top of the folder, as ppo/'s does, so eval loads and compares it.
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
    assert not (folder / "checkpoint").exists() and (folder / "pm" / "README.md").is_file()
    assert eval_models(cfg)["rlhf"] == str(folder)

    capsys.readouterr()
    rlhf.run_rlhf(cfg, show_progress=False)  # a finished stage is skipped, not redone
    assert "already done" in capsys.readouterr().err
    assert json.loads((folder / "manifest.json").read_text())["attempts"] == 2


def test_a_pm_trained_on_other_comparisons_is_not_reused(tiny_model_dir, small_constitution, tmp_path, monkeypatch):
    source = _write(tmp_path / "pairs.jsonl", [json.loads(line) for line in HH.read_text().splitlines()])
    cfg = _cfg(tiny_model_dir, small_constitution, tmp_path, f"rlhf.helpful_data={source}", "rlhf.variant=helpful")
    marker = cfg.run_dir / "rlhf" / "pm" / "finished.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"pairs_digest": "from other data", "metrics": {}}))
    with pytest.raises(CaiError, match="trained on other comparisons"):
        rlhf.run_rlhf(cfg, show_progress=False)


def test_rlhf_dpo_on_the_gold_helpfulness_pairs(tiny_model_dir, small_constitution, tmp_path):
    cfg = _cfg(tiny_model_dir, small_constitution, tmp_path, "rlhf.helpful_data=gold:dev", "rlhf.variant=helpful",
               "rlhf.algo=dpo")
    folder = rlhf.run_rlhf(cfg, show_progress=False)
    counts = json.loads((folder / "manifest.json").read_text())["counts"]
    n_helpful = sum(g.axis == "helpfulness" for g in load_gold_pairs("gold", "dev"))
    assert (counts["helpfulness_pairs"], counts["harmlessness_pairs"], counts["algo"]) == (n_helpful, 0, "dpo")
    assert counts["pairs"] == counts["train_pairs"] and counts["steps"] >= 1  # DPO on the PM's training pairs
    assert (folder / "model.safetensors").is_file() and (folder / "pm" / "model.safetensors").is_file()
    assert not (folder / "trainer").exists()
    import torch
    from safetensors.torch import load_file

    start, trained = load_file(str(tiny_model_dir / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_policy_sft_needs_the_sl_cai_model_before_any_model_loads(tiny_model_dir, small_constitution, tmp_path):
    cfg = _cfg(tiny_model_dir, small_constitution, tmp_path, "rlhf.variant=helpful", "rlhf.policy=sft")
    with pytest.raises(CaiError, match="run `cai sft` first"):
        rlhf.run_rlhf(cfg, show_progress=False)
    assert not (cfg.run_dir / "rlhf" / "pm").exists()


def test_cai_rlhf_says_what_is_wrong_with_a_source(cai_cli, tmp_path):
    result = cai_cli("rlhf", "--set", f"runs_dir={tmp_path}", "--set", "rlhf.variant=helpful",
                     "--set", f"rlhf.helpful_data={tmp_path / 'missing.jsonl'}")
    assert result.code == 1 and "missing.jsonl does not exist" in result.err and "Traceback" not in result.err
