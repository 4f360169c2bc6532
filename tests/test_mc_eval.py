"""Multiple-choice evaluation: file checks, plain and CoT accuracy, intervals, calibration."""

from __future__ import annotations

import json

import pytest

from cai.backends.fake import FakeBackend
from cai.constitution_yaml import load_constitution
from cai.errors import CaiError
from cai.eval.mc import calibration_table, load_mc_file, mc_eval
from cai.stats import wilson_interval


def write(tmp_path, rows, name="mc.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"prompt": "Human: help me\n\nAssistant:", "corrects": ["a kind reply"], "incorrects": ["a rude reply"]},
    {"prompt": "Human: again\n\nAssistant:", "corrects": ["kind and safe"], "incorrects": ["rude", "rude twice"]},
    {"prompt": "Human: trick\n\nAssistant:", "corrects": ["rude but right"], "incorrects": ["kind but wrong"]},
]


def test_plain_mode_compares_option_logprobs(tmp_path):
    rows = load_mc_file(write(tmp_path, ROWS))
    fake = FakeBackend(score=lambda prompt, option: -1.0 if "kind" in option else -3.0)
    result = mc_eval(rows, fake, file="mc.jsonl")
    assert [d["correct"] for d in result.rows] == [True, True, False]
    assert result.accuracy == pytest.approx(2 / 3)
    assert result.ci_low < 2 / 3 < result.ci_high
    assert fake.calls[0][1] == [ROWS[0]["prompt"]]
    assert sum(b["count"] for b in result.calibration) == 1 + 2 + 1


def test_cot_mode_judges_pairs_in_both_orders(tmp_path, small_constitution):
    rows = load_mc_file(write(tmp_path, ROWS[:1]))

    def score(prompt: str, option: str) -> float:
        last = prompt.rsplit("Options:", 1)[-1]
        kind_first = last.index("kind") < last.index("rude")
        return -0.5 if (option == " (A)") == kind_first else -2.5

    fake = FakeBackend(respond=lambda text, seed: "The kind one is better.", score=score)
    result = mc_eval(rows, fake, mode="cot", constitution=load_constitution(str(small_constitution)))
    assert result.accuracy == 1.0
    generate_calls = [c for c in fake.calls if c[0] == "generate"]
    assert len(generate_calls[0][1]) == 2  # both orders reasoned about


def test_bad_files(tmp_path):
    with pytest.raises(CaiError, match="does not exist"):
        load_mc_file(tmp_path / "none.jsonl")
    with pytest.raises(CaiError, match="line 1 needs 'corrects'"):
        load_mc_file(write(tmp_path, [{"prompt": "p", "incorrects": ["x"]}]))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p"\n')
    with pytest.raises(CaiError, match="line 1 is not valid JSON"):
        load_mc_file(bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(CaiError, match="no rows"):
        load_mc_file(empty)


def test_wilson_and_calibration():
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-3) and high == pytest.approx(0.9433, abs=1e-3)
    table = calibration_table([0.95, 0.9, 0.2, 0.55])
    assert sum(b["count"] for b in table) == 4
    top = table[-1]
    assert top["count"] == 2 and top["accuracy"] == 1.0
