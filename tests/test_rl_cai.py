"""RL-CAI end to end on a tiny model: sample -> label -> pm -> ppo, and pm-free dpo; artifacts checked."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from cai.io import read_jsonl
from cai.train.pm import Pair, RewardScorer, mix_and_split
from cai.config import PMConfig


def manifest(cfg, folder):
    return json.loads((cfg.run_dir / folder / "manifest.json").read_text())


def test_samples_and_labels(tiny_run):
    samples = read_jsonl(tiny_run.run_dir / "sample" / "red-team.jsonl")
    assert len(samples) == 8 and all(len(r["responses"]) == 2 for r in samples)
    labels = read_jsonl(tiny_run.run_dir / "label" / "data.jsonl")
    assert labels and all(0 <= r["p_a"] <= 1 for r in labels)
    assert {r["set"] for r in labels} == {"red-team", "helpfulness"}
    helpful = [r for r in labels if r["set"] == "helpfulness"]
    assert all(e["principle_id"] == "helpfulness" for r in helpful for e in r["per_principle"])
    counts = manifest(tiny_run, "label")["counts"]
    assert counts["pairs"] == len(labels) and "position_bias" in counts


def test_preference_model_artifacts(tiny_run):
    folder = tiny_run.run_dir / "pm"
    counts = manifest(tiny_run, "pm")["counts"]
    assert counts["train_pairs"] > 0 and counts["eval_pairs"] > 0
    metrics = json.loads((folder / "metrics.json").read_text())
    assert 0 <= metrics["eval_ece"] <= 1 and metrics["calibration"]
    scorer = RewardScorer.from_folder(folder)
    prompt = [{"role": "user", "content": "hello"}]
    one = scorer.score([prompt], ["an answer"])
    batched = scorer.score([prompt, prompt, prompt], ["a much longer answer than the other", "an answer", "x"])
    assert one[0] == pytest.approx(batched[1], abs=1e-5)  # a score never depends on its batch


def test_pm_learns_a_separable_preference(tiny_model_dir, tmp_path):
    """On pairs where the preferred answer always contains one word, held-out accuracy beats chance."""
    from cai.train.pm import train_preference_model

    words = ["apple", "river", "stone", "cloud", "green", "music", "bread", "light"]
    pairs = [Pair([{"role": "user", "content": f"question {i}"}], f"kind answer {w}", f"rude answer {w}", 1.0 if i % 2 else 0.0, str(i))
             for i, w in enumerate(words * 4)]
    pairs = [Pair(p.prompt, p.response_a, p.response_b, 1.0, p.group) if p.p_a else Pair(p.prompt, p.response_b, p.response_a, 0.0, p.group) for p in pairs]
    cfg = PMConfig(epochs=6, batch_size=8, learning_rate=3e-3, eval_fraction=0.25)
    train, held_out, _ = mix_and_split(pairs, [], cfg.model_copy(update={"helpfulness_ratio": 0.0}), seed=0)
    metrics = train_preference_model(train, held_out, base=str(tiny_model_dir), out_dir=tmp_path / "pm", config=cfg,
                                     show_progress=False)
    assert metrics["eval_accuracy"] > 0.75
    assert metrics["last_loss"] < metrics["first_loss"]


def test_ppo_artifacts_and_log(tiny_run):
    folder = tiny_run.run_dir / "ppo"
    log = read_jsonl(folder / "train_log.jsonl")
    steps = [r for r in log if "kl" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("reward_mean", "reward_std", "kl", "entropy", "clip_fraction", "value_loss", "explained_variance",
                "response_length", "gen_s", "score_s", "opt_s", "kl_coef"):
        assert all(key in r for r in steps), key
    evals = [r["eval_reward"] for r in log if "eval_reward" in r]
    assert len(evals) == 3 and all(math.isfinite(v) for v in evals)  # start, step 2, step 4
    assert (folder / "model.safetensors").is_file() and (folder / "value_head.safetensors").is_file()
    assert (folder / "README.md").is_file() and not (folder / "checkpoint").exists()
    counts = manifest(tiny_run, "ppo")["counts"]
    assert counts["steps"] == 4
    assert (counts["max_kl"], counts["final_kl"]) == (max(r["kl"] for r in steps), steps[-1]["kl"])


def test_dpo_artifacts(tiny_run):
    folder = tiny_run.run_dir / "dpo"
    counts = manifest(tiny_run, "dpo")["counts"]
    assert counts["pairs"] > 0 and counts["steps"] >= 1
    assert (folder / "model.safetensors").is_file() and (folder / "README.md").is_file()
    assert not (folder / "trainer").exists()
    import torch
    from safetensors.torch import load_file

    from cai.models import load_model

    # DPO moved the weights away from the SFT policy it started from, and its folder loads as saved.
    start, trained = load_file(str(tiny_run.run_dir / "sft" / "model.safetensors")), load_file(str(folder / "model.safetensors"))
    assert trained.keys() == start.keys() and any(not torch.equal(trained[k], start[k]) for k in start)
    loaded = load_model(str(folder)).model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in trained.items())


def test_ppo_resumes_from_checkpoint(tiny_run, tmp_path, monkeypatch):
    from cai.train import ppo, ppo_steps

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run.run_dir, runs / tiny_run.name)
    shutil.rmtree(runs / tiny_run.name / "ppo")
    cfg = tiny_run.model_copy(update={"runs_dir": str(runs)})
    real = ppo_steps.policy_loss
    calls = {"n": 0}

    def crash_in_step_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2 * 2 * 2:  # steps 1-2 ran (2 epochs x 2 minibatches each)
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo_steps, "policy_loss", crash_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        ppo.run_ppo(cfg, show_progress=False)
    folder = runs / tiny_run.name / "ppo"
    assert json.loads((folder / "checkpoint" / "state.json").read_text())["step"] == 2
    monkeypatch.undo()
    ppo.run_ppo(cfg, show_progress=False)
    log = read_jsonl(folder / "train_log.jsonl")
    assert [r["step"] for r in log if "kl" in r][-2:] == [3, 4]
    assert json.loads((folder / "manifest.json").read_text())["attempts"] == 2


def test_lora_ppo_reference_is_the_adapter_switched_off(tiny_run, tmp_path):
    """PPO with LoRA: the reference is the policy with its adapter off, so the first step's KL is 0
    (LoRA's B matrices start at zero); the saved model is merged and the adapter kept beside it."""
    from cai.data import PromptRow
    from cai.config import PPOConfig, SamplingConfig
    from cai.train.ppo import train_ppo

    prompts = [PromptRow(id=f"p{i}", messages=[{"role": "user", "content": f"question {i}"}]) for i in range(4)]
    config = PPOConfig(steps=2, rollout_batch=4, minibatch=2, epochs=1, learning_rate=1e-3, eval_every=100,
                      save_every=100, sampling=SamplingConfig(max_new_tokens=6, temperature=1.0),
                      lora={"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0})
    train_ppo(prompts, [], prompts[:2], policy_spec=str(tiny_run.run_dir / "sft"),
              pm_folder=tiny_run.run_dir / "pm", out_dir=tmp_path / "ppo", config=config,
              show_progress=False)
    steps = [r for r in read_jsonl(tmp_path / "ppo" / "train_log.jsonl") if "kl" in r]
    assert steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert steps[1]["kl"] != pytest.approx(0.0, abs=1e-9)  # the adapter has moved by step 2
    assert (tmp_path / "ppo" / "model.safetensors").is_file()
    assert (tmp_path / "ppo" / "adapter" / "adapter_config.json").is_file()


def test_pack_aligns_responses():
    from cai.train.policy_forward import pack

    batch = pack([[1, 2, 3], [4]], [[5, 6], [7]], pad_id=0)
    assert batch["prompt_len"] == 3
    assert batch["input_ids"].tolist() == [[1, 2, 3, 5, 6], [0, 0, 4, 7, 0]]
    assert batch["response_mask"].tolist() == [[1, 1], [1, 0]]
    assert batch["position_ids"].tolist()[1][2:4] == [0, 1]


def test_human_helpfulness_comparisons_mix_with_the_ai_labels():
    from cai.train.pm import Pair, mix_and_split

    def pairs(kind, n, tag):
        return [Pair([{"role": "user", "content": f"{tag}{i}"}], "a", "b", 1.0, f"{tag}{i}", kind) for i in range(n)]

    harmless, ai_helpful, human = pairs("harmlessness", 12, "h"), pairs("helpfulness", 10, "ai"), pairs("helpfulness", 10, "hu")
    config = PMConfig(helpfulness_ratio=0.5, human_ratio=0.25, eval_fraction=0.0)
    train, _, counts = mix_and_split(harmless + ai_helpful, human, config, seed=0)
    assert counts["helpfulness_pairs"] == 12 and counts["human_helpfulness_pairs"] == 3  # 12 wanted, a quarter human
    assert sum(p.group.startswith("ai") for p in train) == 9 and counts["helpfulness_source"] == "human+ai"
    _, _, alone = mix_and_split(harmless, human, config, seed=0)  # no AI helpfulness labels: all from humans
    assert alone["human_helpfulness_pairs"] == 10 and alone["helpfulness_source"] == "human"


def test_ppo_trains_only_on_the_tokens_the_pm_scored(tiny_backend):
    """With a stop string, the rollout's response ids end where the scored text ends, not past the stop."""
    from cai.backends.hf import Generation
    from cai.train.ppo_steps import scored_tokens
    from cai.types import SamplingParams

    tok = tiny_backend.tokenizer
    chat = [{"role": "user", "content": "Say something long."}]
    free = tiny_backend.generate_tokens([chat], SamplingParams(max_new_tokens=24))[0]
    words = free.text.split()
    assert len(words) >= 4, free.text  # the tiny model's greedy answer has enough text to stop inside it
    stop = words[len(words) // 2]
    stopped = tiny_backend.generate_tokens([chat], SamplingParams(max_new_tokens=24, stop=[stop]))[0]
    assert stopped.ended and stopped.end_token is None and stop not in stopped.text
    kept = scored_tokens(stopped, tok)
    assert len(kept) < len(stopped.token_ids)  # the stop string's tokens are dropped
    assert kept == stopped.token_ids[:len(kept)]
    decoded = tok.decode(kept, skip_special_tokens=True)
    assert decoded.startswith(stopped.text)
    assert not tok.decode(kept[:-1], skip_special_tokens=True).startswith(stopped.text) or len(kept) == 1

    # The rollout PPO trains on holds exactly those ids.
    from types import SimpleNamespace

    from cai.config import PPOConfig
    from cai.data import PromptRow
    from cai.train.ppo_steps import sample_rollout

    models = SimpleNamespace(policy=tiny_backend.model, backend=tiny_backend, tokenizer=tok)
    config = PPOConfig(rollout_batch=1, helpfulness_ratio=0.0)
    rollout = sample_rollout(models, [PromptRow("p", chat)], [], SamplingParams(max_new_tokens=24, stop=[stop]),
                             config, 0, 1)
    assert rollout.responses == [kept]

    # EOS and length-limited rows were scored whole; a stop at once keeps one token to credit.
    ids = tok.encode("plain answer here", add_special_tokens=False)
    assert scored_tokens(Generation([1], ids, "plain answer here", True, end_token=2), tok) == ids
    assert scored_tokens(Generation([1], ids, "plain answer here", False), tok) == ids
    assert scored_tokens(Generation([1], ids, "", True), tok) == ids[:1]


def test_pm_micro_batches_give_the_whole_batch_update(tiny_model_dir, tmp_path):
    """Pairs split over several forward passes train the PM to the same weights and loss as one pass."""
    from safetensors.torch import load_file

    from cai.train.pm import train_preference_model

    pairs = [Pair([{"role": "user", "content": f"question {i} " * (1 + i % 3)}], f"answer one {i} " * (1 + i % 4),
                  f"answer two {i}", 0.2 + 0.1 * (i % 6), str(i)) for i in range(8)]
    outs = {}
    for name, budget in (("whole", 100_000), ("split", 50)):
        cfg = PMConfig(epochs=1, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, micro_batch_tokens=budget)
        metrics = train_preference_model(pairs, [], base=str(tiny_model_dir), out_dir=tmp_path / name, config=cfg,
                                         show_progress=False)
        outs[name] = (load_file(str(tmp_path / name / "model.safetensors")), metrics["first_loss"])
    (whole, loss_whole), (split, loss_split) = outs["whole"], outs["split"]
    assert loss_whole == pytest.approx(loss_split, rel=1e-4)
    # Adam's first step is about lr * sign(gradient): where a gradient is near zero, rounding in the
    # order of the sums can tip it, so the weights agree to 1% of a step (the step itself moves them 1e-2).
    assert max((whole[k] - split[k]).abs().max().item() for k in whole) < 1e-4


def test_response_forward_reads_only_the_response_positions_and_matches_the_full_logits(tiny_model_dir):
    """Log-probs, entropy and values from logits at the response positions only equal those from full logits."""
    import torch

    from cai.losses.ppo import entropy_from_logits, logprobs_from_logits
    from cai.models import load_model
    from cai.train.answer_loss import accepts_logits_to_keep
    from cai.train.policy_forward import ValueHead, forward_response, pack

    model = load_model(str(tiny_model_dir), device="cpu").model.eval()
    assert accepts_logits_to_keep(model)
    head = ValueHead(model.config.hidden_size)
    batch = pack([[5, 6, 7, 8], [9, 10]], [[11, 12, 13], [14]], pad_id=0)
    with torch.no_grad():
        got = forward_response(model, head, batch)
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], output_hidden_states=True)
    p = batch["prompt_len"]
    full = out.logits[:, p - 1:-1]
    torch.testing.assert_close(got["logprobs"], logprobs_from_logits(full, batch["input_ids"][:, p:]))
    torch.testing.assert_close(got["entropy"], entropy_from_logits(full))
    torch.testing.assert_close(got["values"], head(out.hidden_states[-1][:, p - 1:-1]))


def test_pm_figures_carry_their_n_and_interval(tiny_run):
    """The held-out line says how many pairs it rests on; a handful is called too few to read."""
    from cai.eval.verdict import describe_pm

    metrics = json.loads((tiny_run.run_dir / "pm" / "metrics.json").read_text())
    n = metrics["eval_accuracy_n"]
    assert 0 <= n <= metrics["eval_pairs"]  # pairs labelled exactly 0.5 have no side to get right
    line = describe_pm(metrics)
    if n:
        low, high = metrics["eval_accuracy_ci"]
        assert 0 <= low <= metrics["eval_accuracy"] <= high <= 1
        low, high = metrics["eval_ece_ci"]
        assert 0 <= low <= high <= 1
    assert "not measured" in line if n == 0 else (f"{n} pairs are too few to read" in line) if n < 10 else (f"on {n} pairs" in line)
    assert not re.search(r"\d\.\d{4,}", line)  # no figure with more digits than its interval allows


def test_pm_line_rounds_to_its_interval_and_says_when_pairs_are_too_few():
    from cai.eval.verdict import describe_pm

    many = {"eval_accuracy": 0.625, "eval_accuracy_ci": [0.47, 0.76], "eval_accuracy_n": 40,
            "eval_accuracy_before": 0.5, "eval_accuracy_before_ci": [0.35, 0.65],
            "eval_ece": 0.14641456305980682, "eval_ece_ci": [0.09, 0.21]}
    assert describe_pm(many) == ("held-out accuracy 62% [47, 76] on 40 pairs (before training 50% [35, 65]), "
                                 "expected calibration error 0.15 [0.09, 0.21]")
    few = {**many, "eval_accuracy": 0.0, "eval_accuracy_before": 1 / 3, "eval_accuracy_n": 3}
    assert describe_pm(few).startswith("held-out accuracy: 3 pairs are too few to read (0 right after training, 1 before")
    assert "not measured" in describe_pm({**many, "eval_accuracy": None, "eval_accuracy_n": 0})


def test_ppo_logs_a_kl_that_cannot_be_negative(tiny_run):
    rows = [r for r in read_jsonl(tiny_run.run_dir / "ppo" / "train_log.jsonl") if "reward_mean" in r]
    assert rows and all(r["kl_k3"] >= 0 for r in rows)


def test_a_progress_rate_without_tokens_shows_no_token_rate():
    from cai.progress import rate_text

    assert rate_text(3, 0, 2.0) == "1.50 rows/s"
    assert rate_text(3, 100, 2.0) == "1.50 rows/s 50.0 tok/s"


def test_eval_sets_the_judging_methods_side_by_side_and_checks_the_pm_on_gold(tiny_run):
    results = json.loads((tiny_run.run_dir / "eval" / "results.json").read_text())
    label_counts = manifest(tiny_run, "label")["counts"]
    assert set(results["judge_methods"]) == {"mc", "mc-cot", "votes"}
    assert results["judge_method"] == label_counts["method"] and results["judge_method_chosen_by"] == "the label stage"
    assert results["judge_check"]["all"]["pairs"] == results["judge_methods"][results["judge_method"]]["all"]["pairs"]
    pm = results["pm_gold"]["all"]
    assert pm["pairs"] == 12 and 0 <= pm["ci"][0] <= pm["agreement"] <= pm["ci"][1] <= 1
    page = (tiny_run.run_dir / "report.html").read_text()
    assert f"{results['judge_method']} (used)" in page and "The preference model against the human gold pairs" in page
