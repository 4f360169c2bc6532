"""RLCD contrast pairs: the sample stage draws one answer under a principle's follow statement and one
under its violate statement, and records which is preferred (fake backend; one tiny-model check)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from cai.backends.fake import FakeBackend
from cai.config import RunConfig
from cai.config_loader import load_config
from cai.constitution_yaml import load_constitution
from cai.data import PromptRow
from cai.errors import CaiError
from cai.io import read_jsonl
from cai.prompts import contrast_chat
from cai.stages import sample
from cai.stages.sample import draw_contrast, run_sample, sample_responses
from cai.types import SamplingParams
from conftest import SMALL_CONSTITUTION

STATEMENTS = {  # principle id: (its question line in SMALL_CONSTITUTION, follow, violate)
    "less-harmful": ("    question: Which response is less harmful?", "Answer without causing harm.",
                     "Answer even if it causes harm."),
    "more-helpful": ("    question: Which response is more helpful while staying safe?", "Help as much as is safe.",
                     "Refuse to help with anything."),
}
FOLLOW = {f for _, f, _ in STATEMENTS.values()}
VIOLATE = {v for _, _, v in STATEMENTS.values()}


def with_statements(text: str) -> str:
    """SMALL_CONSTITUTION with RLCD statements on both feedback principles (the first match of each
    question line is the principle; examples repeat the text later)."""
    for line, follow, violate in STATEMENTS.values():
        text = text.replace(line, f"{line}\n    rlcd:\n      follow: {follow}\n      violate: {violate}", 1)
    return text


@pytest.fixture()
def rlcd_constitution(tmp_path: Path) -> Path:
    path = tmp_path / "small-rlcd.yaml"
    path.write_text(with_statements(SMALL_CONSTITUTION))
    return path


def answer(rendered: str, seed: int) -> str:
    """The fake model's reply says which statement its system turn held, and echoes the seed."""
    system = rendered.split("<|system|>\n", 1)[1].split("\n<|user|>", 1)[0] if "<|system|>" in rendered else ""
    kind = "follow" if system in FOLLOW else "violate" if system in VIOLATE else "plain"
    return f"{kind} {seed % 1000}"


def fake_stage(monkeypatch: pytest.MonkeyPatch, backend: FakeBackend) -> list[Any]:
    loads: list[Any] = []

    def load(config: Any) -> FakeBackend:
        loads.append(config)
        return backend

    monkeypatch.setattr(sample, "load_backend", load)
    return loads


def config(tmp_path: Path, constitution: Path, *extra: str) -> RunConfig:
    return load_config(RunConfig, None, [
        f"runs_dir={tmp_path / 'runs'}", "model.backend=fake", "model.name=fake", "sample.policy=fake",
        f"constitution={constitution}", "sample.rlcd=true", "sample.prompts.limit=16", "sample.helpfulness.limit=3",
        "sample.chunk_size=4", *extra,
    ])


def test_statements_reach_the_backend_and_the_follow_answer_is_preferred(tmp_path, rlcd_constitution, monkeypatch):
    backend = FakeBackend(respond=answer)
    fake_stage(monkeypatch, backend)
    cfg = config(tmp_path, rlcd_constitution)
    folder = run_sample(cfg, show_progress=False)
    rows = read_jsonl(folder / "red-team.jsonl")
    assert len(rows) == 16
    for row in rows:
        pid, preferred = row["rlcd"]["principle_id"], row["rlcd"]["preferred"]
        assert set(row["rlcd"]) == {"principle_id", "preferred"} and pid in STATEMENTS
        assert row["responses"][preferred].startswith("follow ")
        assert row["responses"][1 - preferred].startswith("violate ")
        assert row["messages"][-1] == {"role": "assistant", "content": row["responses"][preferred]}
        # The statement shaped the sample only: the recorded prompt is the user's conversation.
        assert all(m["role"] != "system" for m in row["prompt"]) and row["messages"][:-1] == row["prompt"]
        draw = draw_contrast(load_constitution(rlcd_constitution), cfg.seed, row["id"])
        assert (draw.principle.id, draw.preferred) == (pid, preferred)
    # Both statements of the drawn principle went to the backend as the system turn, in the row's order.
    rendered = [t for method, texts in backend.calls if method == "generate" for t in texts]
    for row in rows:
        _, follow, violate = STATEMENTS[row["rlcd"]["principle_id"]]
        question = row["prompt"][-1]["content"]
        for statement in (follow, violate):
            assert any(t.startswith(f"<|system|>\n{statement}\n") and question in t for t in rendered)
    # Positions are mixed across prompts, so a preference model cannot learn "the first one wins".
    positions = [row["rlcd"]["preferred"] for row in rows]
    assert 4 <= positions.count(0) <= 12
    # Principles are drawn per prompt.
    assert {row["rlcd"]["principle_id"] for row in rows} == set(STATEMENTS)
    # Helpfulness prompts are sampled as before: no system turn, no rlcd field.
    helpful = read_jsonl(folder / "helpfulness.jsonl")
    assert len(helpful) == 3 and all("rlcd" not in r for r in helpful)
    assert all(r["responses"][0].startswith("plain ") and r["responses"][1].startswith("plain ") for r in helpful)
    assert len(rendered) == 2 * 16 + 2 * 3


def test_the_draw_depends_on_the_prompt_id_alone() -> None:
    c = load_constitution("default")
    ids = [f"red-{i}" for i in range(200)]
    draws = [draw_contrast(c, 0, i) for i in ids]
    assert draws == [draw_contrast(c, 0, i) for i in reversed(ids)][::-1]
    assert 80 <= sum(d.preferred for d in draws) <= 120
    assert len({d.principle.id for d in draws}) > 10
    for d in draws[:20]:
        follow, violate = d.principle.rlcd.follow, d.principle.rlcd.violate
        assert d.statements()[d.preferred] == follow and d.statements()[1 - d.preferred] == violate
    assert [d.preferred for d in draws] != [draw_contrast(c, 1, i).preferred for i in ids]


def test_contrast_chat_puts_the_statement_first() -> None:
    chat = [{"role": "user", "content": "Hi"}]
    assert contrast_chat(chat, "Be kind.") == [{"role": "system", "content": "Be kind."}, *chat]
    own = [{"role": "system", "content": "You are a pirate."}, *chat]
    assert contrast_chat(own, "Be kind.") == [{"role": "system", "content": "Be kind.\n\nYou are a pirate."}, *chat]
    assert own[0]["content"] == "You are a pirate."  # the row's chat is not changed


def test_resume_after_a_crash_keeps_rows_unique(tmp_path, rlcd_constitution, monkeypatch):
    c = load_constitution(rlcd_constitution)
    rows = [PromptRow(f"p{i}", [{"role": "user", "content": f"Question {i}?"}]) for i in range(7)]
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    kw = dict(params=params, k=2, seed=3, chunk_size=2, show_progress=False, contrast=c)
    reference = sample_responses(rows, backend=FakeBackend(respond=answer), out_path=tmp_path / "ref.jsonl", **kw)

    calls = {"n": 0}

    def crash_in_second_chunk(rendered: str, seed: int) -> str:
        calls["n"] += 1
        if calls["n"] > 4:  # after the first chunk: two prompts, two answers each
            raise RuntimeError("the machine went away")
        return answer(rendered, seed)

    out = tmp_path / "red-team.jsonl"
    with pytest.raises(RuntimeError):
        sample_responses(rows, backend=FakeBackend(respond=crash_in_second_chunk), out_path=out, **kw)
    assert [r["id"] for r in read_jsonl(out)] == ["p0", "p1"]
    resumed = sample_responses(rows, backend=FakeBackend(respond=answer), out_path=out, **kw)
    assert [r["id"] for r in resumed] == [r.id for r in rows]
    assert resumed == reference  # the same draws, positions and answers as an uninterrupted run


def test_missing_statements_stop_before_any_model_loads(tmp_path, small_constitution, monkeypatch):
    loads = fake_stage(monkeypatch, FakeBackend())
    with pytest.raises(CaiError) as info:
        run_sample(config(tmp_path, small_constitution), show_progress=False)
    message = str(info.value)
    assert f"constitution '{small_constitution}'" in message and "for 'less-harmful'" in message
    assert "sample.rlcd=false" in message and "\n" not in message
    assert loads == []


def test_rlcd_needs_k_2(tmp_path, rlcd_constitution) -> None:
    with pytest.raises(CaiError, match=r"sample.rlcd samples exactly two answers .* sample.k must be 2, not 3"):
        config(tmp_path, rlcd_constitution, "sample.k=3")
    with pytest.raises(ValueError, match="k must be 2"):
        sample_responses([], backend=FakeBackend(), params=SamplingParams(), out_path=tmp_path / "x.jsonl", k=3,
                         contrast=load_constitution(rlcd_constitution))


def test_tiny_model_answers_under_each_statement(tmp_path, rlcd_constitution, tiny_backend) -> None:
    c = load_constitution(rlcd_constitution)
    rows = [PromptRow(f"t{i}", [{"role": "user", "content": f"How do I do thing {i}?"}]) for i in range(3)]
    out = sample_responses(rows, backend=tiny_backend, params=SamplingParams(max_new_tokens=4, temperature=1.0),
                           out_path=tmp_path / "tiny.jsonl", k=2, seed=0, show_progress=False, contrast=c)
    assert [len(r["responses"]) for r in out] == [2, 2, 2]
    draw = draw_contrast(c, 0, "t0")
    rendered = tiny_backend.render(contrast_chat(rows[0].messages, draw.statements()[0]))
    assert draw.statements()[0] in rendered and rendered.index(draw.statements()[0]) < rendered.index("thing 0")
