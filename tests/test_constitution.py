"""Constitution data model, YAML validation (every error path), round trip, sampling, display."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

from cai.constitution import (
    Constitution,
    CritiquePrinciple,
    CritiqueRevisionExample,
    FeedbackPrinciple,
    RlcdStatements,
    constitution_summary,
    sample_critique_principles,
    sample_feedback_principles,
    show_constitution,
)
from cai.constitution_yaml import (
    builtin_constitution_names,
    dump_constitution,
    load_constitution,
    parse_constitution,
    save_constitution,
)
from cai.errors import CaiError
from cai.prompts import critique_chat

# A small valid file. Line numbers matter: the error tests below refer to them.
BASE = """\
name: tiny
description: A tiny test constitution.
version: "1"
critique_revision_principles:
  - id: harm
    critique_request: Say what is harmful.
    revision_request: Remove the harm.
  - id: evasive
    critique_request: Say what is evasive.
    revision_request: Be more helpful.
feedback_principles:
  - id: safer
    question: Which is safer?
critique_revision_examples:
  - conversation:
      - role: user
        content: Hi
    response: Hello
    principle: harm
    critique: Fine.
    revision: Hello
feedback_examples:
  - conversation:
      - role: user
        content: Hi
    response_a: Hello
    response_b: Go away
    question: Which is kinder?
    answer: A
cot_feedback_examples:
  - conversation:
      - role: user
        content: Hi
    response_a: Hello
    response_b: Go away
    principle: safer
    reasoning: (A) is kinder.
    answer: A
"""


def write(tmp_path: Path, text: str | bytes, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def edited(old: str, new: str) -> str:
    assert old in BASE, old
    return BASE.replace(old, new, 1)


def load_error(tmp_path: Path, text: str | bytes) -> str:
    path = write(tmp_path, text)
    with pytest.raises(CaiError) as info:
        load_constitution(path)
    message = str(info.value)
    assert str(path) in message
    assert "\n" not in message and message.endswith((".", "?"))
    return message


# --------------------------------------------------------------------------- valid input


def test_base_loads_and_expands_principle_references(tmp_path: Path) -> None:
    c = load_constitution(str(write(tmp_path, BASE)))  # a str that is not a built-in name is a path
    assert [p.id for p in c.critique_revision_principles] == ["harm", "evasive"]
    assert c.version == "1"
    ex = c.critique_revision_examples[0]
    assert ex.conversation == [{"role": "user", "content": "Hi"}]
    # `principle: harm` stands for both of that principle's requests.
    assert (ex.critique_request, ex.revision_request) == ("Say what is harmful.", "Remove the harm.")
    assert c.feedback_examples[0].question == "Which is kinder?"
    assert c.cot_feedback_examples[0].question == "Which is safer?"
    assert c.cot_feedback_examples[0].reasoning == "(A) is kinder."


def test_optional_example_lists_numeric_version_and_block_text(tmp_path: Path) -> None:
    text = BASE.split("critique_revision_examples:")[0]
    text = text.replace('version: "1"', "version: 2.5").replace(
        "    question: Which is safer?", "    question: |\n      Which is\n      safer?\n"
    )
    c = load_constitution(write(tmp_path, text))
    assert c.version == "2.5"
    assert c.feedback_principles[0].question == "Which is\nsafer?"  # trailing newline trimmed
    assert c.critique_revision_examples == () and c.cot_feedback_examples == ()


def test_rlcd_statements_load_and_stay_out_of_examples(tmp_path: Path) -> None:
    c = load_constitution(write(tmp_path, edited(SAFER, WITH_RLCD)))
    assert c.feedback_principles[0].rlcd == RlcdStatements("Answer safely.", "Answer even if it is unsafe.")
    # `principle: safer` in an example stands for the question only.
    assert c.cot_feedback_examples[0].question == "Which is safer?"
    assert parse_constitution(dump_constitution(c)) == c
    assert "(1 with RLCD statements)" in constitution_summary(c)
    assert load_constitution(write(tmp_path, BASE, "plain.yaml")).feedback_principles[0].rlcd is None


# --------------------------------------------------------------------------- every error path

SAFER = "    question: Which is safer?"
WITH_RLCD = SAFER + "\n    rlcd:\n      follow: Answer safely.\n      violate: |\n        Answer even if it is unsafe.\n"

CASES = [
    # (old text, new text, line, fragments the message must contain)
    ("    question: Which is safer?", "    question: Which: is safer?", 13,
     ["is not valid YAML at line 13", "mapping values are not allowed"]),
    (BASE, BASE + "---\nname: again\n", 39, ["is not valid YAML at line 39", "expected a single document"]),
    (BASE, "- just\n- a list\n", 1, ["the top level must be a mapping", "not a list"]),
    (BASE, BASE + "colour: red\n", 39, ["the top level has the unknown key 'colour'"]),
    (BASE, BASE + "1: one\n", 39, ["the top level has a key that is a number"]),
    ("description: A tiny test constitution.\n", "", 1,
     ["the top level is missing the required key 'description'"]),
    ("    critique_request: Say what is harmful.", "    critque_request: Say what is harmful.", 6,
     ["critique_revision_principles[0] (id 'harm') has the unknown key 'critque_request'",
      "did you mean 'critique_request'?"]),
    ("    revision_request: Be more helpful.\n", "", 8,
     ["critique_revision_principles[1] (id 'evasive') is missing the required key 'revision_request'"]),
    ("  - id: evasive", "  - id: harm", 8,
     ["critique_revision_principles[1] (id 'harm') reuses an id first given on line 5"]),
    ("  - id: evasive", "  - id: not evasive", 8,
     ["critique_revision_principles[1] field 'id'", "must be a short name"]),
    ("    question: Which is safer?", "    question: Which is safer?\n    question: Again?", 14,
     ["feedback_principles[0] has the key 'question' twice (first on line 13)"]),
    ('version: "1"', "version: [1]", 3, ["top-level key 'version' must be text, not a list"]),
    ("name: tiny", "name: yes", 1,
     ["top-level key 'name' must be text, not a true/false value (put it in quotes)"]),
    ("  - id: safer\n    question: Which is safer?", "  - Which is safer?", 12,
     ["feedback_principles[0] must be a mapping of keys to values, not text"]),
    ("feedback_principles:\n  - id: safer\n    question: Which is safer?", "feedback_principles: safer", 11,
     ["feedback_principles must be a list, not text"]),
    ("feedback_principles:\n  - id: safer\n    question: Which is safer?", "feedback_principles: []", 11,
     ["feedback_principles is an empty list"]),
    ("    critique: Fine.", '    critique: "   "', 20,
     ["critique_revision_examples[0] field 'critique' is empty or only whitespace"]),
    ("    revision: Hello", "    revision:", 21,
     ["critique_revision_examples[0] field 'revision' must be text, not empty (null)"]),
    ("    response: Hello\n    principle: harm", "    principle: harm", 15,
     ["critique_revision_examples[0] is missing the required key 'response'"]),
    ("      - role: user\n        content: Hi\n    response: Hello\n    principle",
     "      - role: bot\n        content: Hi\n    response: Hello\n    principle", 16,
     ["critique_revision_examples[0] field 'conversation[0].role' is 'bot'", "system, user, assistant"]),
    ("        content: Hi\n    response: Hello\n    principle",
     "        text: Hi\n    response: Hello\n    principle", 17,
     ["critique_revision_examples[0] field 'conversation[0]' has the unknown key 'text'"]),
    ("        content: Hi\n    response: Hello\n    principle",
     "        content: Hi\n      - role: assistant\n        content: Hello\n    response: Hello\n    principle", 18,
     ["critique_revision_examples[0] field 'conversation[1]' must be a 'user' message"]),
    ("        content: Hi\n    response: Hello\n    principle",
     "        content: Hi\n      - role: system\n        content: Be nice.\n    response: Hello\n    principle", 18,
     ["critique_revision_examples[0] field 'conversation[1].role' is 'system'", "only as the first message"]),
    ("  - conversation:\n      - role: user\n        content: Hi\n    response: Hello\n    principle",
     "  - conversation: []\n    response: Hello\n    principle", 15,
     ["critique_revision_examples[0] field 'conversation' is an empty list"]),
    ("    principle: harm", "    principle: harms", 19,
     ["critique_revision_examples[0] field 'principle' refers to 'harms'", "critique_revision_principles",
      "did you mean 'harm'?"]),
    ("    principle: safer", "    principle: safer\n    question: Which is nicer?", 36,
     ["cot_feedback_examples[0] gives both 'principle' and 'question'"]),
    ("    question: Which is kinder?\n", "", 23,
     ["feedback_examples[0] is missing 'question'", "principle: <id>"]),
    ("    answer: A", "    answer: C", 29, ["feedback_examples[0] field 'answer' is 'C' but must be A or B"]),
    ("    reasoning: (A) is kinder.\n    answer: A", "    reasoning: (A) is kinder.\n    answer: (A)", 38,
     ["cot_feedback_examples[0] field 'answer' is '(A)' but must be A or B"]),
    # A feedback principle's RLCD statements.
    (SAFER, SAFER + "\n    rlcd: Be safe.", 14,
     ["feedback_principles[0] (id 'safer') field 'rlcd' must be a mapping of keys to values, not text"]),
    (SAFER, SAFER + "\n    rlcd:", 14, ["field 'rlcd' must be a mapping of keys to values, not empty (null)"]),
    (SAFER, SAFER + "\n    rlcd:\n      follow: Be safe.", 15,
     ["feedback_principles[0] (id 'safer') field 'rlcd' is missing the required key 'violate'"]),
    (SAFER, SAFER + "\n    rlcd:\n      folow: Be safe.\n      violate: Be reckless.", 15,
     ["field 'rlcd' has the unknown key 'folow'; did you mean 'follow'?"]),
    (SAFER, SAFER + "\n    rlcd:\n      follow: Be safe.\n      violate: '  '", 16,
     ["feedback_principles[0] (id 'safer') field 'rlcd.violate' is empty or only whitespace"]),
    (SAFER, SAFER + "\n    rlcd:\n      follow: yes\n      violate: Be reckless.", 15,
     ["field 'rlcd.follow' must be text, not a true/false value (put it in quotes)"]),
    (SAFER, SAFER + "\n    rlcd:\n      follow: Be safe.\n      follow: Be safer.\n      violate: No.", 16,
     ["field 'rlcd' has the key 'follow' twice (first on line 15)"]),
]


@pytest.mark.parametrize(("old", "new", "line", "fragments"), CASES, ids=[c[3][0][:60] for c in CASES])
def test_validation_errors_name_file_entry_field_and_line(
    tmp_path: Path, old: str, new: str, line: int, fragments: list[str]
) -> None:
    message = load_error(tmp_path, edited(old, new))
    assert f"line {line}" in message
    for fragment in fragments:
        assert fragment in message


def test_empty_file(tmp_path: Path) -> None:
    assert "is empty" in load_error(tmp_path, "# only a comment\n")


def test_control_character_is_refused(tmp_path: Path) -> None:
    assert "is not valid YAML" in load_error(tmp_path, edited("Say what is harmful.", "Say what\x07 is harmful."))


def test_not_utf8_names_the_line(tmp_path: Path) -> None:
    data = edited("Say what is evasive.", "Say what is \xe9vasive.").encode("latin-1")
    message = load_error(tmp_path, data)
    assert "is not valid UTF-8 text (line 9)" in message


def test_missing_file_and_unknown_name(tmp_path: Path) -> None:
    for spec in (tmp_path / "nope.yaml", "defualt"):
        with pytest.raises(CaiError, match="neither a built-in name .*default.* nor an existing file"):
            load_constitution(spec)


def test_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CaiError, match="is a directory"):
        load_constitution(tmp_path)


# --------------------------------------------------------------------------- built-ins


def test_builtin_names() -> None:
    assert {"default", "child-tutor"} <= set(builtin_constitution_names())


@pytest.mark.parametrize("name", builtin_constitution_names())
def test_every_builtin_loads_and_round_trips(name: str, tmp_path: Path) -> None:
    c = load_constitution(name)
    assert c.name == name
    assert c.critique_revision_principles and c.feedback_principles
    assert c.critique_revision_examples and c.feedback_examples and c.cot_feedback_examples
    # Every shipped feedback principle can sample an RLCD contrast pair, two different statements.
    assert all(p.rlcd and p.rlcd.follow != p.rlcd.violate for p in c.feedback_principles)
    assert parse_constitution(dump_constitution(c)) == c
    save_constitution(c, tmp_path / "sub" / "copy.yaml")
    assert load_constitution(tmp_path / "sub" / "copy.yaml") == c


def test_default_constitution_content() -> None:
    c = load_constitution("default")
    assert len(c.critique_revision_principles) >= 16
    assert len(c.feedback_principles) >= 16
    assert len(c.critique_revision_examples) >= 4
    assert len(c.feedback_examples) >= 3 and len(c.cot_feedback_examples) >= 3
    ids = {p.id for p in c.critique_revision_principles}
    for topic in ("privacy", "self-harm", "misinformation", "manipulation", "engage-dont-evade", "no-preaching"):
        assert topic in ids
    # One example shows a response that was already fine and is kept as it was.
    assert any(e.revision == e.response for e in c.critique_revision_examples)
    # Both letters are taught, so the few-shot does not bias the label toward one.
    assert {e.answer for e in c.feedback_examples} == {"A", "B"}
    assert {e.answer for e in c.cot_feedback_examples} == {"A", "B"}
    # The critique/revision few-shot must fit a small model's context (~4 characters per token).
    chat = critique_chat(c, [{"role": "user", "content": "x"}], "y", c.critique_revision_principles[0])
    assert sum(len(m["content"]) for m in chat) < 6000


def test_default_file_starts_with_usage_comment() -> None:
    text = (Path(__file__).parents[1] / "src/cai/constitutions/default.yaml").read_text(encoding="utf-8")
    assert text.startswith("#") and "cai constitution show default" in text.split("\nname:")[0]


def test_round_trip_of_multiline_and_odd_text(tmp_path: Path) -> None:
    c = Constitution(
        name="odd\nname",
        description="Line one\nline two: with a colon",
        version="0.1",
        critique_revision_principles=(CritiquePrinciple("a", "Is it 'bad'? #1", "yes"),),
        feedback_principles=(FeedbackPrinciple("b", "- which?"),),
        critique_revision_examples=(
            CritiqueRevisionExample([{"role": "system", "content": "null"}, {"role": "user", "content": "1.5"}],
                                    "true", "Is it 'bad'? #1", "[x]", "yes", "a\n\nb"),
        ),
    )
    assert parse_constitution(dump_constitution(c)) == c


# --------------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_and_order_independent() -> None:
    c = load_constitution("default")
    keys = [f"row-{i}" for i in range(20)]
    forward = {k: sample_critique_principles(c, 4, 7, k) for k in keys}
    backward = {k: sample_critique_principles(c, 4, 7, k) for k in reversed(keys)}
    assert forward == backward
    assert sample_feedback_principles(c, 4, 7, "row-3") == sample_feedback_principles(c, 4, 7, "row-3")
    # More rounds extend the list instead of reshuffling it.
    assert sample_critique_principles(c, 8, 7, "row-3")[:4] == forward["row-3"]
    assert all(p in c.critique_revision_principles for ps in forward.values() for p in ps)


def test_sampling_differs_by_seed_key_and_purpose() -> None:
    c = load_constitution("default")
    ids = lambda ps: [p.id for p in ps]  # noqa: E731
    assert ids(sample_critique_principles(c, 20, 1, "r")) != ids(sample_critique_principles(c, 20, 2, "r"))
    assert ids(sample_critique_principles(c, 20, 1, "r")) != ids(sample_critique_principles(c, 20, 1, "s"))
    assert ids(sample_feedback_principles(c, 20, 1, "r")) != ids(sample_feedback_principles(c, 20, 2, "r"))
    # With replacement: 20 draws from 18 principles must repeat one.
    assert len(set(ids(sample_critique_principles(c, 20, 1, "r")))) < 20


def test_sampling_is_pinned() -> None:
    # Changing the seed derivation silently changes every dataset made so far; pin it.
    c = Constitution("t", "d", "1", tuple(CritiquePrinciple(str(i), "c", "r") for i in range(10)),
                     tuple(FeedbackPrinciple(str(i), "q") for i in range(10)))
    assert [p.id for p in sample_critique_principles(c, 5, 0, "row")] == PINNED_CRITIQUE
    assert [p.id for p in sample_feedback_principles(c, 5, 0, "row")] == PINNED_FEEDBACK


PINNED_CRITIQUE = ["5", "2", "0", "4", "2"]
PINNED_FEEDBACK = ["8", "2", "2", "0", "1"]


def test_sampling_edge_cases() -> None:
    c = load_constitution("default")
    assert sample_critique_principles(c, 0, 1, "r") == []
    with pytest.raises(CaiError, match="0 or more"):
        sample_feedback_principles(c, -1, 1, "r")


# --------------------------------------------------------------------------- display


def render(c: Constitution) -> str:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    show_constitution(c, console)
    return console.file.getvalue()


def test_show_constitution_lists_ids_and_counts() -> None:
    c = load_constitution("default")
    out = render(c)
    for p in (*c.critique_revision_principles, *c.feedback_principles):
        assert p.id in out
    assert "RLCD statements" in out and "violate: " in out
    assert "Few-shot examples" in out and "chain of thought" in out
    assert constitution_summary(c).startswith("default (version 1.0): 18 critique/revision principles")


def test_show_constitution_prints_brackets_literally() -> None:
    c = Constitution("x", "uses [bold]brackets[/bold]", "1", (CritiquePrinciple("a", "[red]c", "r"),),
                     (FeedbackPrinciple("b", "q"),))
    out = render(c)
    assert "[bold]brackets[/bold]" in out and "[red]c" in out

