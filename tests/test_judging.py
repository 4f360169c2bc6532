"""Judging methods and the choice between them: votes, abstentions, auto's table, cai judge-check."""

from __future__ import annotations

import json
import re

import pytest

from cai.backends.fake import FakeBackend
from cai.config import LabelConfig, RunConfig
from cai.config_loader import load_config
from cai.constitution_yaml import load_constitution
from cai.data.gold import load_gold_pairs, stratified
from cai.errors import CaiError, LogprobsUnavailable
from cai.pipeline import run_stage
from cai.prompts import vote_probability
from cai.stages.label import best_method, label_pairs, make_pairs, measure_methods
from cai.train.pm import pairs_from_labels

ROWS = [{"id": "p1", "set": "red-team", "prompt": [{"role": "user", "content": "hurt someone?"}],
         "responses": ["a safe answer", "a harmful answer"]},
        {"id": "p2", "set": "red-team", "prompt": [{"role": "user", "content": "steal?"}],
         "responses": ["a harmful answer", "a safe answer"]}]


def safe_slot(text: str) -> str:
    """Which slot of the last question holds the answer with 'safe' in it."""
    last = text.rsplit("Options:", 1)[-1]
    return "A" if "safe" in re.search(r"\(A\) (.*)", last).group(1) else "B"


def label(tmp_path, small_constitution, backend, **config):
    pairs, _ = make_pairs(ROWS, "consecutive")
    return label_pairs(pairs, constitution=load_constitution(str(small_constitution)), backend=backend,
                       config=LabelConfig(chunk_size=2, **config), out_path=tmp_path / "d.jsonl", show_progress=False)


def test_votes_are_the_smoothed_share_of_written_verdicts(tmp_path, small_constitution):
    # Four of five verdicts name the safe answer, one names the other: P(first) = (4 + 1) / (5 + 2) when safe is first.
    def respond(text: str, seed: int) -> str:
        right = safe_slot(text)
        wrong = "B" if right == "A" else "A"
        return f" ({wrong})" if seed % 5 == 0 else f" ({right}) because it avoids harm."

    fake = FakeBackend(respond=respond)
    rows = label(tmp_path, small_constitution, fake, method="votes", votes=5)
    for row, safe_first in zip(rows, (True, False)):
        for order, p in row["per_principle"][0]["p_first"].items():
            votes = row["per_principle"][0]["votes"][order]
            a, b = votes.count("a"), votes.count("b")
            assert a + b == 5 and p == pytest.approx(vote_probability(a, b), abs=1e-6)
        assert (row["p_a"] > 0.5) == safe_first and row["method"] == "votes" and not row["abstained"]
    # Every verdict was sampled: 2 pairs x 2 orders x 5 votes, with distinct seeds per vote.
    assert sum(len(texts) for method, texts in fake.calls if method == "generate") == 20


def test_a_pair_whose_every_verdict_names_neither_is_an_abstention_that_trains_nothing(tmp_path, small_constitution):
    fake = FakeBackend(respond=lambda text, seed: "Both answers have merit; I cannot decide.")
    rows = label(tmp_path, small_constitution, fake, method="votes", votes=3)
    assert all(r["abstained"] and r["p_a"] == 0.5 for r in rows)
    assert all(e["p_a"] is None and e["p_first"] == {"ab": None, "ba": None} for r in rows for e in r["per_principle"])
    assert pairs_from_labels(rows) == []


def test_best_method_takes_the_best_that_clears_chance_else_the_cheapest():
    def row(agreement, low, pairs=10, abstentions=0):
        return {"all": {"agreement": agreement, "ci": (low, 0.9), "pairs": pairs}, "abstentions": abstentions}

    assert best_method({"mc": row(0.6, 0.52), "mc-cot": row(0.8, 0.6), "votes": row(0.7, 0.55)}) == "mc-cot"
    assert best_method({"mc": row(0.7, 0.52), "votes": row(0.7, 0.55)}) == "votes"  # the higher floor
    assert best_method({"mc": row(0.7, 0.55), "votes": row(0.7, 0.55)}) == "mc"  # then the cheaper
    # Only a method whose interval clears chance can win on agreement ...
    assert best_method({"mc": row(0.55, 0.3), "mc-cot": row(0.9, 0.45), "votes": row(0.6, 0.51)}) == "votes"
    # ... and when none does, the cheapest that answered labels: nothing measured is worth paying for.
    assert best_method({"mc": row(0.5, 0.3), "mc-cot": row(0.7, 0.4), "votes": row(0.6, 0.35)}) == "mc"
    assert best_method({"mc-cot": row(0.7, 0.4), "votes": row(0.6, 0.35)}) == "mc-cot"
    assert best_method({"mc": row(0.4, 0.2, abstentions=10), "votes": row(0.5, 0.2)}) == "votes"
    assert best_method({"mc": {"unsupported": "no log-probs"}, "votes": row(0.5, 0.2, abstentions=10)}) == "votes"
    assert best_method({"mc": {"unsupported": "no log-probs"}}) is None


class NoLogprobs(FakeBackend):
    """A chat server that writes but returns no log-probabilities (or refuses the scoring request)."""

    error = LogprobsUnavailable("http://judge:8000/v1 returned no log-probs")

    def choice_logprobs(self, prompts, options):
        raise self.error


@pytest.mark.parametrize("error", [LogprobsUnavailable("http://judge:8000/v1 returned no log-probs"),
                                   CaiError("http://judge:8000/v1 answered 400: Unrecognized request argument")])
def test_a_judge_without_log_probs_is_measured_by_votes_only(error, tmp_path, small_constitution):
    judge = NoLogprobs(respond=lambda text, seed: f" ({safe_slot(text) if 'Options:' in text else 'A'})")
    judge.error = error
    gold = stratified(load_gold_pairs("gold", "dev"), 8)
    table = measure_methods(gold, ["mc", "mc-cot", "votes"], constitution=load_constitution(str(small_constitution)),
                            backend=judge, config=LabelConfig(votes=2), folder=tmp_path, seed=0, show_progress=False)
    assert table["mc"] == {"unsupported": str(error)}
    assert "unsupported" in table["mc-cot"] and table["votes"]["all"]["pairs"] == 8
    assert best_method(table) == "votes"


def fake_run(tmp_path, small_constitution, *extra):
    return load_config(RunConfig, None, [
        f"runs_dir={tmp_path / 'runs'}", "name=j", f"constitution={small_constitution}", "model.backend=fake",
        "critique.prompts.limit=3", "critique.helpfulness=null", "sample.policy=fake", "sample.prompts.limit=4",
        "sample.helpfulness=null", "label.gold_check=8", "label.votes=2", *extra])


def test_auto_measures_each_method_and_labels_with_the_best(tmp_path, small_constitution):
    cfg = fake_run(tmp_path, small_constitution)
    for stage in ("critique", "sample", "label"):
        run_stage(cfg, stage, show_progress=False)
    counts = json.loads((cfg.run_dir / "label" / "manifest.json").read_text())["counts"]
    table = counts["judge_methods"]
    assert set(table) == {"mc", "mc-cot", "votes"} and all(table[m]["all"]["pairs"] == 8 for m in table)
    assert counts["method"] == best_method(table) and counts["method_chosen_by"] == "auto"
    assert counts["labels_carry_signal"] == (counts["gold_agreement_ci"][0] > 0.5)
    rows = [json.loads(line) for line in (cfg.run_dir / "label" / "data.jsonl").read_text().splitlines()]
    assert rows and all(r["method"] == counts["method"] for r in rows)
    for method in table:  # each method's rows are kept, so a rerun measures nothing twice
        assert (cfg.run_dir / "label" / f"gold_check.{method}.jsonl").is_file()


def test_a_named_method_is_measured_alone(tmp_path, small_constitution):
    cfg = fake_run(tmp_path, small_constitution, "label.method=mc")
    for stage in ("critique", "sample", "label"):
        run_stage(cfg, stage, show_progress=False)
    counts = json.loads((cfg.run_dir / "label" / "manifest.json").read_text())["counts"]
    assert list(counts["judge_methods"]) == ["mc"] and counts["method_chosen_by"] == "config"


def test_judge_check_command_prints_the_method_table(tmp_path, small_constitution, cai_cli):
    sets = ["--set", f"runs_dir={tmp_path / 'runs'}", "--set", f"constitution={small_constitution}",
            "--set", "model.backend=fake", "--set", "label.votes=2"]
    result = cai_cli("judge-check", *sets, "--limit", "6", "--methods", "mc,votes")
    assert result.code == 0, result.err
    assert "judging methods of" in result.out and "6 dev gold pairs" in result.out and ("best: " in result.out or "no method clears chance: auto would label with the cheapest" in result.out)
    saved = list((tmp_path / "runs").glob("*/judge-check/dev-*/table.json"))
    assert len(saved) == 1 and set(json.loads(saved[0].read_text())["methods"]) == {"mc", "votes"}
    # Fewer pairs than an earlier check on the same settings: its rows are reused, but only the asked ones count.
    fewer = cai_cli("judge-check", *sets, "--limit", "4", "--methods", "mc,votes")
    assert fewer.code == 0 and "(n=4)" in fewer.out
    assert json.loads(saved[0].read_text())["methods"]["mc"]["all"]["pairs"] == 4
    bad = cai_cli("judge-check", *sets, "--methods", "mc,telepathy")
    assert bad.code == 1 and "unknown method 'telepathy'" in bad.err


def test_rlcd_pairs_are_labelled_by_construction_without_a_judge(tmp_path, small_constitution):
    cfg = fake_run(tmp_path, small_constitution, "constitution=default", "sample.rlcd=true", "label.method=rlcd",
                   "sample.helpfulness={source: helpfulness, limit: 2}", "label.feedback_model={name: missing, backend: hf}")
    for stage in ("sample", "label"):  # the label stage would fail to load the missing feedback model if it asked one
        run_stage(cfg, stage, show_progress=False)
    samples = {r["id"]: r for r in map(json.loads, (cfg.run_dir / "sample" / "red-team.jsonl").read_text().splitlines())}
    rows = [json.loads(line) for line in (cfg.run_dir / "label" / "data.jsonl").read_text().splitlines()]
    assert len(rows) == len(samples) == 4
    for row in rows:
        preferred = samples[row["source_id"]]["rlcd"]["preferred"]
        assert row["p_a"] == (1.0 if preferred == 0 else 0.0) and row["method"] == "rlcd"
        assert row["chosen"][0]["content"] == samples[row["source_id"]]["responses"][preferred]
    counts = json.loads((cfg.run_dir / "label" / "manifest.json").read_text())["counts"]
    assert counts["method"] == "rlcd" and counts["helpfulness_pairs_left_out"] == 2


def test_rlcd_labels_need_rlcd_samples(tmp_path, small_constitution):
    from cai.pipeline import check_inputs

    with pytest.raises(CaiError, match=r"label.method is rlcd.*set sample.rlcd=true"):
        check_inputs(fake_run(tmp_path, small_constitution, "label.method=rlcd"))


def test_label_shards_merge_with_their_method(tmp_path, small_constitution):
    from cai.runs import merge_stage

    cfg = fake_run(tmp_path, small_constitution)
    for stage in ("critique", "sample"):
        run_stage(cfg, stage, show_progress=False)
    for shard in ("0/2", "1/2"):
        run_stage(cfg, "label", shard=shard, show_progress=False)
    counts = json.loads((merge_stage(cfg, "label", 2) / "manifest.json").read_text())["counts"]
    assert counts["method"] in ("mc", "mc-cot", "votes") and set(counts["judge_methods"]) == {"mc", "mc-cot", "votes"}
    # Shards that chose different methods cannot pass as one set of labels.
    shard = cfg.run_dir / "label" / "shards" / "1-of-2" / "manifest.json"
    manifest = json.loads(shard.read_text())
    manifest["counts"]["method"] = "votes" if counts["method"] != "votes" else "mc"
    shard.write_text(json.dumps(manifest))
    for name in ("manifest.json", "data.jsonl"):
        (cfg.run_dir / "label" / name).unlink()
    with pytest.raises(CaiError, match="shards labelled by different methods"):
        merge_stage(cfg, "label", 2)
