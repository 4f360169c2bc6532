"""Harmless rate (the judge rates single answers, only when it cleared chance) and the report's sections for it and mc-eval."""

from __future__ import annotations

import json
import re

import pytest

from cai.backends.fake import FakeBackend
from cai.config import LabelConfig
from cai.constitution_yaml import load_constitution
from cai.eval.harmless import harmless_markdown, harmless_rate, p_harmless
from cai.io import read_jsonl
from cai.report.html import write_report


def answers(model: str, responses: list[str]) -> list[dict]:
    return [{"model": model, "set": "red-team", "id": f"p{i}", "prompt": [{"role": "user", "content": f"request {i}"}],
             "response": r} for i, r in enumerate(responses)] + [
        {"model": model, "set": "helpfulness", "id": "h0", "prompt": [{"role": "user", "content": "bake bread?"}],
         "response": "Mix flour and water."}]


def calls_safe_answers_harmless(prompt: str, option: str) -> float:
    """A judge that rates an answer harmless exactly when the answer says 'safe'."""
    last = prompt.rsplit("Options:", 1)[-1]
    first_is_harmless = "is harmless" in re.search(r"\(A\) (.*)", last).group(1)
    harmless = "safe" in prompt.rsplit("Options:", 1)[0].rsplit("request", 1)[-1]
    wanted = "(A)" if harmless == first_is_harmless else "(B)"
    return -0.1 if wanted in option else -4.0


@pytest.fixture()
def rate_inputs(small_constitution, tmp_path):
    rows = answers("base", ["Sure, here is how.", "Here is a safe way.", "Do it like this."]) + answers(
        "sft", ["A safe alternative.", "Here is a safe way.", "Stay safe: ask a pro."])
    return dict(constitution=load_constitution(str(small_constitution)), label_config=LabelConfig(), chat=False,
                out_path=tmp_path / "harmless.jsonl", seed=0), rows


def test_harmless_rate_counts_the_answers_the_judge_rates_harmless_in_both_orders(rate_inputs):
    kw, rows = rate_inputs
    judge = FakeBackend(score=calls_safe_answers_harmless)
    out = harmless_rate(rows, judge=judge, method="mc", judge_check={"trusted": True}, **kw)
    assert out["measured"] and out["method"] == "mc"
    assert out["models"]["base"]["harmless"] == 1 and out["models"]["base"]["n"] == 3  # helpfulness rows are not rated
    assert out["models"]["sft"]["rate"] == 1.0 and out["models"]["sft"]["ci"][0] > 0.3
    assert len(read_jsonl(kw["out_path"])) == 6
    # A rerun asks the judge nothing: every answer's rating is on disk.
    again = FakeBackend(score=calls_safe_answers_harmless)
    assert harmless_rate(rows, judge=again, method="mc", judge_check={"trusted": True}, **kw) == out
    assert again.calls == []
    text = "\n".join(harmless_markdown({"harmless_rate": out}))
    assert "| base | 33% [" in text and "| sft | 100% [" in text


def test_harmless_rate_is_not_measured_by_a_judge_at_chance(rate_inputs):
    kw, rows = rate_inputs
    judge = FakeBackend(score=calls_safe_answers_harmless)
    out = harmless_rate(rows, judge=judge, method="mc", judge_check={"trusted": False}, **kw)
    assert out == {"measured": False, "reason": out["reason"]} and "chance" in out["reason"]
    assert judge.calls == []
    assert "not measured" in "\n".join(harmless_markdown({"harmless_rate": out}))


@pytest.mark.parametrize("first, second, expected", [(0.8, 0.2, 0.8), (0.8, None, 0.8), (None, 0.3, 0.7), (None, None, None)])
def test_p_harmless_averages_the_two_orders(first, second, expected):
    assert p_harmless(first, second) == pytest.approx(expected) if expected is not None else p_harmless(first, second) is None


def test_report_shows_the_harmless_rate_and_the_mc_eval_files(tmp_path):
    run = tmp_path / "r"
    (run / "eval").mkdir(parents=True)
    (run / "config.yaml").write_text("name: r\n")
    results = {"models": ["base", "ppo"], "elo": {}, "answers": {},
               "harmless_rate": {"measured": True, "method": "mc", "models": {
                   "base": {"n": 10, "harmless": 3, "rate": 0.3, "ci": [0.11, 0.6], "abstained": 0},
                   "ppo": {"n": 10, "harmless": 8, "rate": 0.8, "ci": [0.49, 0.94], "abstained": 1}}},
               "mc_eval": [{"file": "hhh.jsonl", "mode": "judge", "n": 40, "correct": 30, "accuracy": 0.75,
                            "ci_low": 0.6, "ci_high": 0.86, "calibration": []}]}
    (run / "eval" / "results.json").write_text(json.dumps(results))
    page = write_report(run).read_text()
    assert "Harmless rate" in page and "80% [49%, 94%]" in page
    assert "Multiple choice" in page and "hhh.jsonl" in page and "75.0% [60.0%, 86.0%]" in page


def test_verdict_compares_each_rl_cai_model_to_each_baseline_on_the_gold_pairs():
    from cai.eval.evaluate import gold_results
    from cai.eval.gold import PairScore
    from cai.eval.verdict import verdict

    def scores(margin):
        return [PairScore(id=f"g{i}", kind="harmful" if i % 2 else "evasive", better=margin + 0.01 * (i % 3), worse=0.0)
                for i in range(20)]

    gold = gold_results({"base": scores(0.0), "sft": scores(0.1), "ppo": scores(0.5), "distill": scores(0.5),
                         "rlhf": scores(0.1)}, n_bootstrap=200, seed=0)
    assert set(gold["vs_baselines"]) == {"sft vs distill", "ppo vs distill", "ppo vs rlhf"}
    lines = verdict({"gold": gold})
    assert any(line.startswith("ppo vs the distill baseline") and "no difference distinguishable" in line for line in lines)
    assert any(line.startswith("ppo vs the rlhf baseline") and "ahead on" in line for line in lines)
