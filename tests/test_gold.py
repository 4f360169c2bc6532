"""Gold comparison pairs: the shipped file's schema, the judge-free measure and the judge check."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from cai.data.gold import KINDS, load_gold_pairs, stratified
from cai.errors import CaiError
from cai.eval import gold as G
from cai.eval.judge_check import judge_agreement, judge_pairs_from_gold


def test_shipped_gold_file_covers_every_red_team_category_and_kind():
    from cai.data import load_prompts

    pairs = load_gold_pairs("gold", split=None)
    assert len(pairs) >= 300 and len({p.id for p in pairs}) == len(pairs)
    red_team_categories = {r.category for r in load_prompts("red-team")[0]}
    harm = [p for p in pairs if p.kind != "helpfulness"]
    assert len(harm) >= 240 and {p.category for p in harm} == red_team_categories
    assert Counter(p.kind for p in pairs).keys() == set(KINDS)
    assert len([p for p in pairs if p.kind == "helpfulness"]) >= 60
    assert sum(len(p.messages) > 1 for p in pairs) >= 30  # multi-turn conversations too
    for split in ("dev", "test"):  # each split holds every kind, so both measure the same things
        assert {p.kind for p in load_gold_pairs("gold", split=split)} == set(KINDS)
    # The worse answer of a harmful pair is not a refusal and the better one is not a bare refusal.
    assert all(len(p.better.split()) >= 25 for p in harm)


@pytest.mark.parametrize("row, needle", [
    ({"id": "x", "category": "c", "kind": "rude", "split": "test", "messages": [{"role": "user", "content": "q"}],
      "better": "a", "worse": "b"}, "kind 'rude'"),
    ({"id": "x", "category": "c", "kind": "harmful", "split": "test",
      "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "better": "a", "worse": "b"}, "end with a user turn"),
    ({"id": "x", "category": "c", "kind": "harmful", "split": "test", "messages": [{"role": "user", "content": "q"}],
      "better": "same", "worse": "same"}, "same text"),
    ({"id": "x", "category": "c", "kind": "harmful", "split": "train", "messages": [{"role": "user", "content": "q"}],
      "better": "a", "worse": "b"}, "split 'train'"),
])
def test_a_bad_gold_row_is_named_by_line(tmp_path, row, needle):
    path = tmp_path / "gold.jsonl"
    good = {"id": "ok", "category": "c", "kind": "evasive", "split": "test",
            "messages": [{"role": "user", "content": "q"}], "better": "yes", "worse": "no"}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(CaiError, match=f"line 2: .*{needle}"):
        load_gold_pairs(path, split=None)


def test_stratified_limit_spreads_over_kinds():
    pairs = load_gold_pairs("gold", split="test")
    picked = stratified(pairs, 8)
    assert len(picked) == 8 and set(Counter(p.kind for p in picked).values()) == {2}


def _manual_mean_logprob(model, tokenizer, chat, answer):
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    head = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    logits = model(input_ids=torch.tensor([full])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[t - 1, full[t]].item() for t in range(len(head), len(full))) / (len(full) - len(head))


def test_answer_logprobs_match_a_hand_computed_mean_whatever_the_batch(tiny_model_dir):
    from cai.models import load_model

    loaded = load_model(str(tiny_model_dir))
    pairs = load_gold_pairs("gold", split="dev")[:3]
    chats, answers = [p.messages for p in pairs], [p.better for p in pairs]
    together = G.answer_logprobs(loaded.model, loaded.tokenizer, chats, answers, batch_size=3)
    alone = [G.answer_logprobs(loaded.model, loaded.tokenizer, [c], [a])[0] for c, a in zip(chats, answers)]
    with torch.no_grad():
        manual = [_manual_mean_logprob(loaded.model, loaded.tokenizer, c, a) for c, a in zip(chats, answers)]
    assert together == pytest.approx(manual, abs=1e-4) and alone == pytest.approx(manual, abs=1e-4)


def test_answer_logprobs_are_the_same_for_a_model_that_returns_every_position(tiny_model_dir):
    """A model whose forward takes no ``logits_to_keep`` (older or custom code) is scored from its full logits."""
    from cai.models import load_model

    loaded = load_model(str(tiny_model_dir))

    class EveryPosition(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)

    pairs = load_gold_pairs("gold", split="dev")[:3]
    chats, answers = [p.messages for p in pairs], [p.better for p in pairs]
    trimmed = G.answer_logprobs(loaded.model, loaded.tokenizer, chats, answers, batch_size=3)
    full = G.answer_logprobs(EveryPosition(loaded.model), loaded.tokenizer, chats, answers, batch_size=3)
    assert full == pytest.approx(trimmed, abs=1e-5)


def test_training_on_the_better_answers_moves_the_measure_beyond_noise(tiny_model_dir):
    """The measure detects what it is for: a model pushed toward the better answers gains margin."""
    from cai.models import load_model

    loaded = load_model(str(tiny_model_dir))
    model, tok = loaded.model, loaded.tokenizer
    pairs = stratified(load_gold_pairs("gold", split="dev"), 12)
    before = G.score_model(model, tok, pairs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(8):
        for p in pairs:
            prompt = tok.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
            ids = torch.tensor([tok(prompt + p.better, add_special_tokens=False)["input_ids"]])
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    model.eval()
    after = G.score_model(model, tok, pairs)
    diff = G.paired_difference(before, after, n_bootstrap=200)
    assert diff["all"]["delta"] > 0 and diff["all"]["beyond_noise"]
    summary = {r["group"]: r for r in G.summarize(after, n_bootstrap=200)}
    assert summary["all"]["accuracy"] > {r["group"]: r for r in G.summarize(before, 200)}["all"]["accuracy"]
    # Unchanged scores are not called a change.
    same = G.paired_difference(before, before, n_bootstrap=200)
    assert same["all"]["delta"] == 0 and not same["all"]["beyond_noise"]


class _OracleBackend:
    """A 'judge' whose (A)/(B) log-probs prefer whichever option text contains the gold better answer."""

    context_length = None
    has_chat_template = False

    def __init__(self, better: set[str], bias: float = 0.0, correct: bool = True):
        self.better, self.bias, self.correct = better, bias, correct

    def render(self, prompt):
        return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)

    def count_tokens(self, prompt):
        return len(self.render(prompt).split())

    def generate(self, prompts, params, *, seeds=None, progress=None):
        return ["" for _ in prompts]

    def choice_logprobs(self, prompts, options):
        out = []
        for p in prompts:
            tail = p[-4000:]
            a_at, b_at = tail.rfind("(A)"), tail.rfind("(B)")
            a_text, b_text = tail[a_at:b_at], tail[b_at:]
            a_good = any(b[:60] in a_text for b in self.better)
            if not self.correct:
                a_good = not a_good
            out.append([0.0 + self.bias if a_good else -2.0 + self.bias, -2.0 if a_good else 0.0])
        return out


def test_judge_check_measures_agreement_and_calls_chance_chance(tmp_path, small_constitution):
    from cai.config import LabelConfig
    from cai.constitution_yaml import load_constitution
    from cai.stages.label import check_judge

    pairs = stratified(load_gold_pairs("gold", split="test"), 40)
    rows = judge_pairs_from_gold(pairs)
    assert 0 < sum(r["better"] == "a" for r in rows) < len(rows)  # the better answer is not always in slot A
    constitution = load_constitution(small_constitution)
    config = LabelConfig(principles_per_label=1, prompt_format="text", gold_check=0)
    better = {p.better for p in pairs}
    for name, judge, expected in (("right", _OracleBackend(better), 1.0), ("wrong", _OracleBackend(better, correct=False), 0.0)):
        check = check_judge(pairs, constitution=constitution, backend=judge, config=config,
                            out_path=tmp_path / f"{name}.jsonl", show_progress=False)
        assert check["all"]["agreement"] == expected and check["all"]["pairs"] == 40
        assert check["trusted"] is (expected == 1.0)
    # A coin-flip judge: agreement near 50% with an interval that holds 50% is not trusted.
    coin = [{"p_a": 0.5, "better": r["better"], "kind": r["kind"], "per_principle": []} for r in rows]
    check = judge_agreement(coin)
    assert check["all"]["agreement"] == 0.5 and not check["trusted"]


def test_verdict_says_what_moved_and_whether_the_judge_counts():
    from cai.eval.verdict import fmt_ci, verdict

    results = {
        "gold": {"base": "base", "vs_base": {
            "sft": {"all": {"delta": 0.05, "ci": (0.02, 0.08), "beyond_noise": True},
                    "harmful": {"delta": 0.09, "ci": (0.04, 0.14), "beyond_noise": True},
                    "evasive": {"delta": -0.01, "ci": (-0.05, 0.03), "beyond_noise": False}},
            "ppo": {"all": {"delta": 0.001, "ci": (-0.02, 0.02), "beyond_noise": False}}}},
        "judge_check": {"all": {"pairs": 60, "agreement": 0.52, "ci": (0.39, 0.64)}, "trusted": False},
    }
    lines = verdict(results, judge_name="bundled")
    text = " ".join(lines)
    assert "sft vs base" in lines[0] and "toward the better answers" in lines[0] and "harmlessness" in lines[0]
    assert "ppo vs base" in lines[1] and "no change distinguishable from noise" in lines[1]
    assert "not evidence" in text and "label.feedback_model" in text
    assert fmt_ci(0.6234, (0.5111, 0.7345), percent=True) == "62% [51, 73]"
    assert fmt_ci(0.04321, (0.0101, 0.0763), sign=True) == "+0.04 [0.01, 0.08]"
    assert fmt_ci(0.0, (0.0, 0.0), percent=True) == "0% [0, 0]"  # every resample agreed: no false digits


def test_gold_command_scores_models_side_by_side(cai_cli, tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "scores.jsonl"
    monkeypatch.setenv("COLUMNS", "200")
    code, text, _ = cai_cli("gold", f"a={tiny_model_dir}", f"b={tiny_model_dir}", "--limit", "8", "-o", out)
    assert code == 0
    assert "change in margin from a" in text
    assert " yes " not in text and " no " in text  # the same model twice: no change beyond noise
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 16 and {r["model"] for r in rows} == {"a", "b"}


def test_eval_models_load_once_each_and_only_one_stays_open(tiny_model_dir, monkeypatch):
    from contextlib import contextmanager
    from types import SimpleNamespace

    from cai.eval.evaluate import ModelsOneAtATime
    from cai.models import load_model

    loaded = load_model(str(tiny_model_dir))
    events = []

    def load(spec):
        events.append(("load", spec))
        served = spec.startswith("http")  # a server backend: its ``model`` is a name, not weights
        return SimpleNamespace(model=spec if served else loaded.model, tokenizer=loaded.tokenizer,
                               close=lambda: events.append(("close", spec)))

    @contextmanager
    def own_model(spec, device):
        events.append(("own", spec))
        yield loaded.model, loaded.tokenizer

    monkeypatch.setattr(G, "own_model", own_model)
    pool = ModelsOneAtATime(load)
    assert pool.backend("a") is pool.backend("a")
    with pool.model("a") as (model, _):
        assert model is loaded.model
    pool.backend("b")
    with pool.model("http://x") as (model, _):  # closed first: never two models in memory
        assert model is loaded.model
    pool.close()
    assert events == [("load", "a"), ("close", "a"), ("load", "b"), ("close", "b"), ("load", "http://x"),
                      ("close", "http://x"), ("own", "http://x")]
    assert pool.loads == 3
