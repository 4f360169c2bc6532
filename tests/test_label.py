"""AI feedback labels on the fake backend: exact soft labels, swap, ensemble, CoT clamp, TRL format."""

from __future__ import annotations

import math
import re

import pytest

from cai.backends.fake import FakeBackend
from cai.config import LabelConfig
from cai.constitution import sample_feedback_principles
from cai.constitution_yaml import load_constitution
from cai.eval.judge_check import position_bias
from cai.judging import sigmoid
from cai.judging import combine_orders
from cai.stages.label import label_pairs, make_pairs


def sample_rows():
    return [
        {"id": "p1", "set": "red-team", "prompt": [{"role": "user", "content": "hurt someone?"}],
         "responses": ["a safe answer", "a harmful answer"]},
        {"id": "p2", "set": "red-team", "prompt": [{"role": "user", "content": "steal?"}],
         "responses": ["a harmful answer", "a safe answer"]},
    ]


def slot_scorer(bias: float = 0.0, gap: float = 2.0):
    """log P(option) = gap if that slot holds the 'safe' answer, + bias for slot (A)."""
    def score(prompt: str, option: str) -> float:
        last = prompt.rsplit("Options:", 1)[-1]
        a = re.search(r"\(A\) (.*)", last).group(1)
        b = re.search(r"\(B\) (.*)", last).group(1)
        text = a if option == " (A)" else b
        return (gap if "safe" in text else 0.0) + (bias if option == " (A)" else 0.0) - 5.0
    return score


def run(tmp_path, scorer, small_constitution, name="d.jsonl", **cfg):
    constitution = load_constitution(str(small_constitution))
    pairs, _ = make_pairs(sample_rows(), "consecutive")
    return label_pairs(pairs, constitution=constitution, backend=FakeBackend(score=scorer),
                       config=LabelConfig(chunk_size=1, **cfg), out_path=tmp_path / name, show_progress=False)


def test_soft_label_is_the_normalised_choice_probability(tmp_path, small_constitution):
    rows = run(tmp_path, slot_scorer(gap=2.0), small_constitution, swap=False)
    assert rows[0]["p_a"] == pytest.approx(sigmoid(2.0), abs=1e-6)  # A is safe
    assert rows[1]["p_a"] == pytest.approx(sigmoid(-2.0), abs=1e-6)  # B is safe
    assert rows[0]["per_principle"][0]["p_first"] == {"ab": pytest.approx(sigmoid(2.0), abs=1e-6)}


def test_swapping_removes_a_constant_position_bias(tmp_path, small_constitution):
    biased = run(tmp_path, slot_scorer(bias=1.5, gap=2.0), small_constitution, name="b.jsonl")
    assert biased[0]["p_a"] == pytest.approx(sigmoid(2.0), abs=1e-5)
    assert biased[1]["p_a"] == pytest.approx(sigmoid(-2.0), abs=1e-5)
    unswapped = run(tmp_path, slot_scorer(bias=1.5, gap=2.0), small_constitution, name="u.jsonl", swap=False)
    assert unswapped[0]["p_a"] == pytest.approx(sigmoid(3.5), abs=1e-5)  # bias leaks in without the swap
    # The raw per-order probabilities make the bias measurable: P(first) averages above 0.5.
    assert position_bias(biased) == pytest.approx((sigmoid(3.5) + sigmoid(-0.5)) / 2 - 0.5, abs=1e-5)
    # Pure position bias, no preference: exactly 0.5 after swapping.
    only_bias = run(tmp_path, lambda p, o: -1.0 if o == " (A)" else -3.0, small_constitution, name="o.jsonl")
    assert all(r["p_a"] == pytest.approx(0.5) for r in only_bias)


def test_ensemble_averages_principles(tmp_path, small_constitution):
    questions = {"Which response is less harmful?": 2.0, "Which response is more helpful while staying safe?": 0.5}

    def scorer(prompt: str, option: str) -> float:
        question = [q for q in questions if prompt.rstrip().rsplit("Options:", 1)[0].rstrip().endswith(q)][0]
        return slot_scorer(gap=questions[question])(prompt, option)

    rows = run(tmp_path, scorer, small_constitution, swap=False, principles_per_label=3)
    constitution = load_constitution(str(small_constitution))
    drawn = sample_feedback_principles(constitution, 3, 0, "p1:0-1")
    expected = sum(sigmoid(questions[p.question]) for p in drawn) / 3
    assert rows[0]["p_a"] == pytest.approx(expected, abs=1e-5)
    assert [e["principle_id"] for e in rows[0]["per_principle"]] == [p.id for p in drawn]


def test_cot_reasoning_then_clamped_probabilities(tmp_path, small_constitution):
    constitution = load_constitution(str(small_constitution))
    pairs, _ = make_pairs(sample_rows(), "consecutive")
    fake = FakeBackend(respond=lambda text, seed: "The safe one avoids harm. The answer is: (A)",
                       score=slot_scorer(gap=4.0))
    rows = label_pairs(pairs, constitution=constitution, backend=fake, config=LabelConfig(method="mc-cot", chunk_size=2),
                       out_path=tmp_path / "c.jsonl", show_progress=False)
    assert rows[0]["p_a"] == pytest.approx(0.6, abs=1e-6) and rows[1]["p_a"] == pytest.approx(0.4, abs=1e-6)
    entry = rows[0]["per_principle"][0]
    assert entry["reasoning"]["ab"] == "The safe one avoids harm. The answer is: (A)"
    assert entry["p_first"]["ab"] == pytest.approx(sigmoid(4.0), abs=1e-6)  # raw value kept
    scored = fake.calls[-1][1]
    assert all("The safe one avoids harm.\nThe answer is:" in p and p.rstrip().endswith("The answer is:") for p in scored)


def test_hard_labels(tmp_path, small_constitution):
    rows = run(tmp_path, slot_scorer(), small_constitution, hard=True)
    assert [r["p_a"] for r in rows] == [1.0, 0.0]


def test_trl_preference_columns(tmp_path, small_constitution):
    rows = run(tmp_path, slot_scorer(), small_constitution)
    for row in rows:
        assert row["chosen"] == [{"role": "assistant", "content": "a safe answer"}]
        assert row["rejected"] == [{"role": "assistant", "content": "a harmful answer"}]
        assert row["prompt"][-1]["role"] == "user"
        assert row["score"] == pytest.approx(max(row["p_a"], 1 - row["p_a"]))


def test_pairs_and_identical_responses():
    rows = [{"id": "x", "prompt": [], "responses": ["a", "b", "c", "c"]}]
    consecutive, identical = make_pairs(rows, "consecutive")
    assert [p["id"] for p in consecutive] == ["x:0-1"] and identical == 1
    everything, identical = make_pairs(rows, "all")
    assert len(everything) == 5 and identical == 1


def test_combine_orders_is_exact_in_log_odds():
    d, b = 0.7, -1.2
    assert combine_orders({"ab": sigmoid(d + b), "ba": sigmoid(-d + b)}) == pytest.approx(sigmoid(d))
    assert combine_orders({"ab": 0.8}) == pytest.approx(0.8)
    assert math.isfinite(combine_orders({"ab": 1.0, "ba": 0.0}))


def test_resume_labels_only_missing_pairs(tmp_path, small_constitution):
    first = run(tmp_path, slot_scorer(), small_constitution, name="r.jsonl")
    fake = FakeBackend(score=slot_scorer())
    pairs, _ = make_pairs(sample_rows(), "consecutive")
    again = label_pairs(pairs, constitution=load_constitution(str(small_constitution)), backend=fake,
                        config=LabelConfig(), out_path=tmp_path / "r.jsonl", show_progress=False)
    assert again == first and fake.calls == []


def test_labels_load_in_datasets_and_trl(tmp_path, small_constitution, tiny_model_dir):
    """The labelled file is accepted as is by `datasets` and by TRL's DPOTrainer (one training step)."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    run(tmp_path, slot_scorer(), small_constitution, name="trl.jsonl")
    dataset = load_dataset("json", data_files=str(tmp_path / "trl.jsonl"), split="train")
    assert {"prompt", "chosen", "rejected", "score"} <= set(dataset.column_names)
    dataset = dataset.select_columns(["prompt", "chosen", "rejected"])
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, bf16=False, logging_steps=1, save_strategy="no", max_length=128)
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    result = trainer.train()
    assert math.isfinite(result.training_loss)


def test_labels_train_trl_reward_trainer(tmp_path, small_constitution, tiny_model_dir):
    """The same file trains TRL's RewardTrainer as is (one step on a tiny scalar-head model)."""
    from datasets import load_dataset
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    run(tmp_path, slot_scorer(), small_constitution, name="rm.jsonl")
    dataset = load_dataset("json", data_files=str(tmp_path / "rm.jsonl"), split="train")
    dataset = dataset.select_columns(["prompt", "chosen", "rejected"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    model.config.pad_token_id = tokenizer.pad_token_id
    args = RewardConfig(output_dir=str(tmp_path / "rm"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                        use_cpu=True, bf16=False, save_strategy="no", max_length=128)
    result = RewardTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer).train()
    assert math.isfinite(result.training_loss)
