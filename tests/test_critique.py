"""The critique/revision stage on the fake backend: exact traces, flags, ablation, resume."""

from __future__ import annotations

import json
import re

import pytest

from cai.backends.fake import FakeBackend
from cai.config import CritiqueConfig
from cai.constitution import sample_critique_principles
from cai.constitution_yaml import load_constitution
from cai.data import PromptRow
from cai.io import read_jsonl
from cai.prompts import clean_output
from cai.stages.critique import is_degenerate, run_critique_revision


def rows(n: int = 5) -> list[PromptRow]:
    return [PromptRow(id=f"r{i}", messages=[{"role": "user", "content": f"harmful request number {i}"}],
                      category="violence") for i in range(n)]


def scripted(text: str, seed: int) -> str:
    """Initial answers, critiques and revisions that say which step and which principle made them."""
    last = text.rsplit("<|user|>", 1)[-1]
    if "Rewrite" in last:
        return "Revision: a safer answer that still engages with the question."
    if "?" in last and "Here is a conversation" in last:
        return "The response gives harmful detail.\nHuman: and it went on"
    return "Sure, here is exactly how to do the harmful thing."


def config(**kw) -> CritiqueConfig:
    return CritiqueConfig(rounds=3, chunk_size=2, **kw)


def test_trace_shape_and_principles(small_constitution, tmp_path):
    constitution = load_constitution(str(small_constitution))
    fake = FakeBackend(respond=scripted)
    out = run_critique_revision(rows(), constitution=constitution, backend=fake, config=config(),
                                out_path=tmp_path / "data.jsonl", seed=3, show_progress=False)
    assert [r["id"] for r in out] == [f"r{i}" for i in range(5)]
    row = out[0]
    assert row["initial_response"] == "Sure, here is exactly how to do the harmful thing."
    expected = [p.id for p in sample_critique_principles(constitution, 3, 3, "r0")]
    assert [r["principle_id"] for r in row["rounds"]] == expected
    for k, rnd in enumerate(row["rounds"]):
        assert rnd["critique"] == "The response gives harmful detail."  # cut at the invented next turn
        assert rnd["revision"] == "a safer answer that still engages with the question."  # label dropped
        # The same text again in a later round is no new revision: flagged, and the answer stays.
        assert rnd["kept_previous"] is (k > 0)
    assert row["final_response"] == row["rounds"][-1]["revision"]
    assert row["messages"][-1] == {"role": "assistant", "content": row["final_response"]}
    assert row["messages"][:-1] == row["prompt"]
    assert set(row["timings"]) == {"initial_s", "critique_s", "revision_s"}
    # One batched call per step per chunk: 3 chunks x (1 initial + 3 rounds x 2 steps).
    assert len(fake.calls) == 3 * 7


def test_few_shot_prefix_is_shared_by_every_critique_prompt(small_constitution, tmp_path):
    fake = FakeBackend(respond=scripted)
    run_critique_revision(rows(4), constitution=load_constitution(str(small_constitution)), backend=fake,
                          config=config(), out_path=tmp_path / "d.jsonl", show_progress=False)
    critique_calls = [texts for _, texts in fake.calls if "Here is a conversation" in texts[0]]
    first = critique_calls[0]
    shared = first[0][: first[0].index("harmful request")]
    assert "How do I bake bread?" in shared  # the few-shot example comes first ...
    assert all(t.startswith(shared) for texts in critique_calls for t in texts)  # ... identical everywhere


def test_empty_or_degenerate_revision_keeps_previous_and_is_flagged(small_constitution, tmp_path):
    def respond(text: str, seed: int) -> str:
        last = text.rsplit("<|user|>", 1)[-1]
        if "Rewrite" in last:
            return "" if "r0" in text or "number 0" in text else "no no no no no no no no no no no no no"
        return "An initial answer with enough words."

    out = run_critique_revision(rows(2), constitution=load_constitution(str(small_constitution)),
                                backend=FakeBackend(respond=respond), config=config(),
                                out_path=tmp_path / "d.jsonl", show_progress=False)
    assert out[0]["final_response"] == "An initial answer with enough words."
    assert out[0]["flags"] == [f"round{i}:empty_revision" for i in (1, 2, 3)]
    assert out[1]["flags"] == [f"round{i}:degenerate_revision" for i in (1, 2, 3)]
    assert all(r["kept_previous"] for row in out for r in row["rounds"])
    assert len(out) == 2  # never dropped


def test_direct_revision_ablation_skips_critiques(small_constitution, tmp_path):
    fake = FakeBackend(respond=scripted)
    out = run_critique_revision(rows(2), constitution=load_constitution(str(small_constitution)), backend=fake,
                                config=config(mode="revision"), out_path=tmp_path / "d.jsonl", show_progress=False)
    assert all(r["critique"] is None for row in out for r in row["rounds"])
    assert len(fake.calls) == 1 + 3  # initial + one revision call per round


def test_text_format_for_completion_models(small_constitution, tmp_path):
    fake = FakeBackend(respond=lambda text, seed: "Fine answer here.\nCritiqueRequest: more")
    out = run_critique_revision(rows(1), constitution=load_constitution(str(small_constitution)), backend=fake,
                                config=config(prompt_format="text"), out_path=tmp_path / "d.jsonl",
                                show_progress=False)
    critique_prompt = fake.calls[1][1][0]
    assert critique_prompt.rstrip().endswith("Critique:")
    assert out[0]["rounds"][0]["critique"] == "Fine answer here."


def test_resume_skips_done_rows_and_repairs_a_torn_line(small_constitution, tmp_path):
    constitution = load_constitution(str(small_constitution))
    path = tmp_path / "d.jsonl"
    first = run_critique_revision(rows(2), constitution=constitution, backend=FakeBackend(respond=scripted),
                                  config=config(), out_path=path, show_progress=False)
    with path.open("a") as f:
        f.write(json.dumps({"id": "r2", "half": True})[:15])  # a crash mid-write
    fake = FakeBackend(respond=scripted)
    out = run_critique_revision(rows(5), constitution=constitution, backend=fake, config=config(),
                                out_path=path, show_progress=False)
    assert [r["id"] for r in out] == [f"r{i}" for i in range(5)]
    assert out[:2] == first
    assert all("harmful request number 0" not in t for _, texts in fake.calls for t in texts)
    assert len(read_jsonl(path)) == 5


def test_same_seed_same_samples(small_constitution, tmp_path):
    constitution = load_constitution(str(small_constitution))
    cfg = config()
    a = run_critique_revision(rows(3), constitution=constitution, backend=FakeBackend(), config=cfg,
                              out_path=tmp_path / "a.jsonl", seed=1, show_progress=False)
    b = run_critique_revision(rows(3)[::-1], constitution=constitution, backend=FakeBackend(), config=cfg,
                              out_path=tmp_path / "b.jsonl", seed=1, show_progress=False)
    strip = lambda r: {k: v for k, v in r.items() if k != "timings"}  # noqa: E731
    assert sorted(map(json.dumps, map(strip, a))) == sorted(map(json.dumps, map(strip, b)))


@pytest.mark.parametrize("text, expected", [
    ("Revision: Better answer.", "Better answer."),
    ("  Critique: fine\n\nHuman: next", "fine"),
    ("Answer text<|im_end|>junk", "Answer text"),
    ("plain", "plain"),
])
def test_clean_output(text, expected):
    assert clean_output(text) == expected


@pytest.mark.parametrize("text, meta", [
    ("The response highlights the importance of safety.", True),
    ("This response is too harsh.", True),
    ("The assistant's last response was fine.", True),
    ("The best way to stay safe is to ask an adult.", False),
    ("I can't help with that, but here is a safer idea.", False),
])
def test_meta_revisions_are_recognised(text, meta):
    from cai.stages.critique import is_meta_revision

    assert is_meta_revision(text) is meta


@pytest.mark.parametrize("text, bad", [
    ("", True), ("ok", True), ("A real answer with several words.", False),
    ("yes " * 30, True), ("line\n" * 5, True),
    ("Here is a careful, helpful answer that explains the risks and offers a safer alternative.", False),
])
def test_is_degenerate(text, bad):
    assert is_degenerate(text) is bad


def test_a_revision_that_parrots_a_few_shot_example_is_rejected(small_constitution, tmp_path):
    def respond(text: str, seed: int) -> str:
        last = text.rsplit("<|user|>", 1)[-1]
        if "Rewrite" in last:
            return "Mix flour, water, yeast and salt, knead, rise, bake."  # the example's revision, verbatim
        return "An initial answer with enough words."

    out = run_critique_revision(rows(1), constitution=load_constitution(str(small_constitution)),
                                backend=FakeBackend(respond=respond), config=config(),
                                out_path=tmp_path / "d.jsonl", show_progress=False)
    assert out[0]["flags"] == [f"round{i}:copied_example_revision" for i in (1, 2, 3)]
    assert out[0]["final_response"] == "An initial answer with enough words."


def test_rewrite_mode_answers_the_user_again_under_the_principle(small_constitution, tmp_path):
    """Rewrite mode: no critique; a system turn holds the draft and the principle, then the user's own turns."""
    seen = []

    def respond(text: str, seed: int) -> str:
        seen.append(text)
        if "Draft reply:" in text:
            return f"a kind and careful answer, version {seed % 97} of it, that helps with the safe part"
        return "Sure, here is exactly how to do the harmful thing."

    fake = FakeBackend(respond=respond)
    out = run_critique_revision(rows(2), constitution=load_constitution(str(small_constitution)), backend=fake,
                                config=config(mode="rewrite", rewrite_lead="I can help with part of this:"),
                                out_path=tmp_path / "d.jsonl", show_progress=False)
    assert len(fake.calls) == 1 + 3  # initial + one batched rewrite call per round, no critique calls
    rewrite_prompts = [t for t in seen if "Draft reply:" in t]
    assert rewrite_prompts and all("harmful request number" in t and "Guideline: Rewrite" in t for t in rewrite_prompts)
    assert all("How do I bake bread" not in t for t in rewrite_prompts)  # no few-shot examples
    for row in out:
        assert all(r["critique"] is None for r in row["rounds"])
        assert row["final_response"].startswith("I can help with part of this: a kind and careful answer")
        assert row["final_response"] != row["initial_response"]


def test_best_of_n_keeps_the_first_candidate_that_passes_the_checks(small_constitution, tmp_path):
    calls = {"n": 0}

    def respond(text: str, seed: int) -> str:
        if "Draft reply:" not in text:
            return "Sure, here is exactly how to do the harmful thing."
        calls["n"] += 1
        # Alternate: a meta comment (rejected), then a real answer.
        return ("The response is harmful and should be rewritten." if calls["n"] % 2
                else f"Here is a safer way to get what you need, option {calls['n']}, with care for everyone.")

    out = run_critique_revision(rows(1), constitution=load_constitution(str(small_constitution)),
                                backend=FakeBackend(respond=respond), config=CritiqueConfig(rounds=1, mode="rewrite", candidates=2),
                                out_path=tmp_path / "d.jsonl", show_progress=False)
    rnd = out[0]["rounds"][0]
    assert not rnd["kept_previous"] and rnd["revision"].startswith("Here is a safer way")
    assert rnd["candidates_tried"] == 2 and rnd["rejected_candidates"] == ["meta"]


def judge_likes(word: str):
    """A judge (choice scoring) that prefers whichever option's answer contains ``word``."""
    def score(prompt: str, option: str) -> float:
        last = prompt.rsplit("Options:", 1)[-1]
        first = re.search(r"\(A\) (.*)", last).group(1)
        favourite = "(A)" if word in first else "(B)"
        return -0.1 if favourite in option else -3.0
    return score


@pytest.mark.parametrize("method", ["mc", "votes"])
def test_judge_acceptance_keeps_the_candidate_the_judge_prefers_over_the_previous_answer(method, small_constitution,
                                                                                         tmp_path):
    """accept: judge asks the judging protocol, both orders, whether each passing candidate beats the
    answer it replaces: the favourite wins over the first that passed, and a round where the judge
    prefers the previous answer keeps it."""
    def respond(text: str, seed: int) -> str:
        if "Options:" in text:  # a written verdict (votes): name the option holding "gentle"
            last = text.rsplit("Options:", 1)[-1]
            return " (A)" if "gentle" in re.search(r"\(A\) (.*)", last).group(1) else " (B)"
        if "Draft reply:" not in text:
            return "Sure, here is exactly how to do the harmful thing."
        return ("Here is a rough way to get what you need, with some care for everyone involved." if seed % 2
                else "Here is a gentle way to get what you need, with real care for everyone involved.")

    constitution = load_constitution(str(small_constitution))
    cfg = CritiqueConfig(rounds=2, mode="rewrite", candidates=4, accept="judge", accept_method=method)
    fake = FakeBackend(respond=respond, score=judge_likes("gentle"))
    out = run_critique_revision(rows(2), constitution=constitution, backend=fake, config=cfg,
                                out_path=tmp_path / "d.jsonl", show_progress=False)
    for row in out:
        first, second = row["rounds"]
        assert first["revision"].startswith("Here is a gentle way") and not first["kept_previous"]
        assert first["judge_p_revision_better"] > 0.5
        # Round 2: every candidate is "unchanged" or loses to the gentle answer it would replace.
        assert second["kept_previous"] and row["final_response"] == first["revision"]
    checks_only = run_critique_revision(rows(2), constitution=constitution, backend=FakeBackend(respond=respond),
                                        config=cfg.model_copy(update={"accept": "checks"}),
                                        out_path=tmp_path / "plain.jsonl", show_progress=False)
    assert all("judge_p_revision_better" not in rnd for row in checks_only for rnd in row["rounds"])


def test_judge_acceptance_rejects_a_revision_the_judge_finds_worse(small_constitution, tmp_path):
    def respond(text: str, seed: int) -> str:
        if "Draft reply:" not in text:
            return "Sure, here is a safe and careful answer to that."
        return "Here is a different answer that the judge will not like at all, honestly."

    cfg = CritiqueConfig(rounds=1, mode="rewrite", accept="judge")
    out = run_critique_revision(rows(1), constitution=load_constitution(str(small_constitution)),
                                backend=FakeBackend(respond=respond, score=judge_likes("safe")), config=cfg,
                                out_path=tmp_path / "d.jsonl", show_progress=False)
    rnd = out[0]["rounds"][0]
    assert rnd["kept_previous"] and rnd["rejected_candidates"] == ["judge_rejected"]
    assert rnd["judge_p_revision_better"] < 0.5
    assert out[0]["flags"] == ["round1:judge_rejected_revision"]


@pytest.mark.parametrize("revision, previous, critique, problem", [
    ("Giving weapon steps is harmful here; explaining the risks and pointing to a licensed club would help more.",
     "Sure, do it.",
     "Giving weapon steps is harmful here; explaining the risks and pointing to a licensed club would help more.",
     "copied_critique"),
    ("Sure, here is how to pick the lock on the door of your neighbour quickly.", 
     "Sure, here is how to pick the lock on the door of your neighbour quickly.", "", "unchanged"),
    ("Sure, here is how to pick the lock on the door of your neighbour quickly. But be careful and stay safe.",
     "Sure, here is how to pick the lock on the door of your neighbour quickly.", "", "extends_previous"),
    ("Here is how to get back into your own home: call a licensed locksmith or your landlord.",
     "Sure, here is how to pick the lock on the door of your neighbour quickly.", "", None),
    # Deleting the harmful half of an answer is a real revision.
    ("Locks keep homes safe, and a locksmith can help you if you are locked out of your own home.",
     "Locks keep homes safe, and a locksmith can help you if you are locked out of your own home. To open a "
     "neighbour's door, slide a card between the door and the frame and wiggle it while pushing.", "", None),
])
def test_revision_checks_catch_copies_repeats_and_extensions(revision, previous, critique, problem, small_constitution):
    from cai.stages.critique import revision_problem

    assert revision_problem(revision, previous=previous, critique=critique,
                            constitution=load_constitution(str(small_constitution))) == problem
