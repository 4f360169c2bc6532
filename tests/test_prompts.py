"""Prompt builders: exact strings on a tiny constitution, shared few-shot prefixes, CoT parsing."""

from __future__ import annotations

import pytest

from cai.constitution import (
    Constitution,
    CotFeedbackExample,
    CritiquePrinciple,
    CritiqueRevisionExample,
    FeedbackExample,
    FeedbackPrinciple,
)
from cai.constitution_yaml import load_constitution
from cai.prompts import (
    ANSWER_LEAD_IN,
    CHOICE_OPTIONS,
    COMPLETION_STOP_STRINGS,
    EXAMPLE_SEPARATOR,
    VERDICT_STOP_STRINGS,
    choice_chat,
    choice_text,
    cot_answer_chat,
    cot_answer_text,
    cot_chat,
    cot_text,
    critique_chat,
    critique_text,
    direct_revision_chat,
    direct_revision_text,
    extract_cot_answer,
    format_conversation,
    parse_verdict,
    revision_chat,
    revision_text,
    verdict_chat,
    verdict_text,
    vote_probability,
)
from cai.types import Chat

INTRO = "Here is a conversation between a human and an AI assistant:"
P = CritiquePrinciple("harm", "Is it harmful?", "Make it harmless.")
F = FeedbackPrinciple("safer", "Which is safer?")
TINY = Constitution(
    name="tiny",
    description="For tests.",
    version="1",
    critique_revision_principles=(P,),
    feedback_principles=(F,),
    critique_revision_examples=(
        CritiqueRevisionExample([{"role": "user", "content": "Q1"}], "R1", "CR1", "C1", "RR1", "V1"),
    ),
    feedback_examples=(FeedbackExample([{"role": "user", "content": "FQ"}], "FA", "FB", "FQ?", "B"),),
    cot_feedback_examples=(
        CotFeedbackExample([{"role": "user", "content": "CQ"}], "CA", "CB", "CQ?", "Because.", "A"),
    ),
)
CONV: Chat = [{"role": "user", "content": "Hi"}]


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


# --------------------------------------------------------------------------- transcript


def test_format_conversation() -> None:
    conv: Chat = [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": " Hi \n"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    assert format_conversation(conv) == "System: Be kind.\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Bye"
    assert format_conversation([]) == ""


# --------------------------------------------------------------------------- critique / revision


def test_critique_and_revision_chat() -> None:
    chat = critique_chat(TINY, CONV, "Hello", P)
    assert chat == [
        user(f"{INTRO}\n\nHuman: Q1\n\nAssistant: R1\n\nCR1"),
        assistant("C1"),
        user("RR1"),
        assistant("V1"),
        user(f"{INTRO}\n\nHuman: Hi\n\nAssistant: Hello\n\nIs it harmful?"),
    ]
    revised = revision_chat(chat, " It is fine. \n", P)
    assert revised == [*chat, assistant("It is fine."), user("Make it harmless.")]
    assert chat[-1]["role"] == "user"  # the input chat is not modified


def test_direct_revision_chat() -> None:
    assert direct_revision_chat(TINY, CONV, "Hello", P) == [
        user(f"{INTRO}\n\nHuman: Q1\n\nAssistant: R1\n\nRR1"),
        assistant("V1"),
        user(f"{INTRO}\n\nHuman: Hi\n\nAssistant: Hello\n\nMake it harmless."),
    ]


def test_critique_and_revision_text() -> None:
    text = critique_text(TINY, CONV, "Hello", P)
    assert text == (
        "Human: Q1\n\nAssistant: R1\n\nCritiqueRequest: CR1\n\nCritique: C1\n\n"
        "RevisionRequest: RR1\n\nRevision: V1"
        "\n\n-----\n\n"
        "Human: Hi\n\nAssistant: Hello\n\nCritiqueRequest: Is it harmful?\n\nCritique:"
    )
    assert revision_text(text, " It is fine.\n", P) == (
        text + " It is fine.\n\nRevisionRequest: Make it harmless.\n\nRevision:"
    )


def test_direct_revision_text() -> None:
    assert direct_revision_text(TINY, CONV, "Hello", P) == (
        "Human: Q1\n\nAssistant: R1\n\nRevisionRequest: RR1\n\nRevision: V1"
        "\n\n-----\n\n"
        "Human: Hi\n\nAssistant: Hello\n\nRevisionRequest: Make it harmless.\n\nRevision:"
    )


def test_without_examples_there_is_no_prefix() -> None:
    bare = Constitution("bare", "d", "1", (P,), (F,))
    assert critique_chat(bare, CONV, "Hello", P) == [user(f"{INTRO}\n\nHuman: Hi\n\nAssistant: Hello\n\nIs it harmful?")]
    assert critique_text(bare, CONV, "Hello", P) == "Human: Hi\n\nAssistant: Hello\n\nCritiqueRequest: Is it harmful?\n\nCritique:"
    assert choice_text(bare, CONV, "a", "b", F).endswith("(B) b\nThe answer is:")


def test_misuse_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        revision_chat([*critique_chat(TINY, CONV, "Hello", P), assistant("x")], "c", P)
    with pytest.raises(ValueError):
        revision_text("Human: Hi", "c", P)
    with pytest.raises(ValueError):
        cot_answer_chat(choice_chat(TINY, CONV, "a", "b", F), "r")
    with pytest.raises(ValueError):
        cot_answer_text(choice_text(TINY, CONV, "a", "b", F), "r")


# --------------------------------------------------------------------------- multiple choice


def test_choice_chat_and_text() -> None:
    chat = choice_chat(TINY, CONV, " Sure. ", "No.", F)
    assert chat == [
        user(f"{INTRO}\n\nHuman: FQ\n\nFQ?\nOptions:\n(A) FA\n(B) FB"),
        assistant("The answer is: (B)"),
        user(f"{INTRO}\n\nHuman: Hi\n\nWhich is safer?\nOptions:\n(A) Sure.\n(B) No."),
        assistant("The answer is:"),
    ]
    assert choice_text(TINY, CONV, " Sure. ", "No.", F) == (
        f"{INTRO}\n\nHuman: FQ\n\nFQ?\nOptions:\n(A) FA\n(B) FB\nThe answer is: (B)"
        "\n\n-----\n\n"
        f"{INTRO}\n\nHuman: Hi\n\nWhich is safer?\nOptions:\n(A) Sure.\n(B) No.\nThe answer is:"
    )


def test_scored_options_continue_the_lead_in_as_the_examples_do() -> None:
    assert CHOICE_OPTIONS == (" (A)", " (B)")
    assert ANSWER_LEAD_IN + CHOICE_OPTIONS[1] == choice_chat(TINY, CONV, "a", "b", F)[1]["content"]


def test_cot_chat_and_answer_chat() -> None:
    chat = cot_chat(TINY, CONV, "a", "b", F)
    assert chat == [
        user(f"{INTRO}\n\nHuman: CQ\n\nCQ?\nOptions:\n(A) CA\n(B) CB"),
        assistant("Let's think step by step: Because.\nThe answer is: (A)"),
        user(f"{INTRO}\n\nHuman: Hi\n\nWhich is safer?\nOptions:\n(A) a\n(B) b"),
        assistant("Let's think step by step:"),
    ]
    answer = cot_answer_chat(chat, " (B) is rude.\n")
    assert answer == [*chat[:-1], assistant("Let's think step by step: (B) is rude.\nThe answer is:")]
    # An answer the model already wrote is cut, so the lead-in is asked once.
    assert cot_answer_chat(chat, "(B) is rude.\nThe answer is: (A)")[-1] == answer[-1]
    assert cot_answer_chat(chat, "  ")[-1] == assistant("Let's think step by step:\nThe answer is:")


def test_cot_text_and_answer_text() -> None:
    text = cot_text(TINY, CONV, "a", "b", F)
    assert text == (
        f"{INTRO}\n\nHuman: CQ\n\nCQ?\nOptions:\n(A) CA\n(B) CB\n"
        "Let's think step by step: Because.\nThe answer is: (A)"
        "\n\n-----\n\n"
        f"{INTRO}\n\nHuman: Hi\n\nWhich is safer?\nOptions:\n(A) a\n(B) b\nLet's think step by step:"
    )
    assert cot_answer_text(text, " (B) is rude.") == text + " (B) is rude.\nThe answer is:"


# --------------------------------------------------------------------------- shared prefix


@pytest.mark.parametrize("constitution", [TINY, load_constitution("default")], ids=["tiny", "default"])
def test_few_shot_prefix_is_identical_across_rows(constitution: Constitution) -> None:
    c = constitution
    row1 = ([{"role": "user", "content": "How do I bake bread?"}], "Knead it.", "Mix.", "No.")
    row2 = ([{"role": "system", "content": "S"}, {"role": "user", "content": "Hi"}], "Yo", "Hey", "Hi!")
    p1, p2 = c.critique_revision_principles[0], c.critique_revision_principles[-1]
    f1, f2 = c.feedback_principles[0], c.feedback_principles[-1]
    n_cr, n_fb, n_cot = (len(c.critique_revision_examples), len(c.feedback_examples),
                         len(c.cot_feedback_examples))

    pairs = [
        (critique_chat(c, row1[0], row1[1], p1), critique_chat(c, row2[0], row2[1], p2), 4 * n_cr),
        (direct_revision_chat(c, row1[0], row1[1], p1), direct_revision_chat(c, row2[0], row2[1], p2), 2 * n_cr),
        (choice_chat(c, row1[0], row1[2], row1[3], f1), choice_chat(c, row2[0], row2[2], row2[3], f2), 2 * n_fb),
        (cot_chat(c, row1[0], row1[2], row1[3], f1), cot_chat(c, row2[0], row2[2], row2[3], f2), 2 * n_cot),
    ]
    for a, b, n in pairs:
        assert a[:n] == b[:n] and a[n] != b[n]

    texts = [
        (critique_text(c, row1[0], row1[1], p1), critique_text(c, row2[0], row2[1], p2), n_cr),
        (direct_revision_text(c, row1[0], row1[1], p1), direct_revision_text(c, row2[0], row2[1], p2), n_cr),
        (choice_text(c, row1[0], row1[2], row1[3], f1), choice_text(c, row2[0], row2[2], row2[3], f2), n_fb),
        (cot_text(c, row1[0], row1[2], row1[3], f1), cot_text(c, row2[0], row2[2], row2[3], f2), n_cot),
    ]
    for a, b, n in texts:
        prefix_a = EXAMPLE_SEPARATOR.join(a.split(EXAMPLE_SEPARATOR)[:n]) + EXAMPLE_SEPARATOR
        prefix_b = EXAMPLE_SEPARATOR.join(b.split(EXAMPLE_SEPARATOR)[:n]) + EXAMPLE_SEPARATOR
        assert prefix_a == prefix_b and a.startswith(prefix_a) and a.count(EXAMPLE_SEPARATOR) == n
        assert not a.endswith((" ", "\n"))


# --------------------------------------------------------------------------- stop strings, CoT parsing


def test_stop_strings_cover_every_label() -> None:
    for label in ("Human:", "Assistant:", "CritiqueRequest:", "Critique:", "RevisionRequest:", "Revision:",
                  "The answer is:"):
        assert "\n" + label in COMPLETION_STOP_STRINGS
    assert EXAMPLE_SEPARATOR.strip("\n") in "".join(COMPLETION_STOP_STRINGS)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("(A) is rude, so the answer is (B).", "B"),
        ("The answer is: (A)", "A"),
        ("I think the answer is B.", "B"),
        ("First the answer is (A)... on reflection the answer is (B)", "B"),
        ("Response (B) is less harmful than (A).", "B"),
        ("So (A) is the better choice.", "A"),
        ("The answer is a tricky one.", None),
        ("(A) is safer but (B) is more helpful.", None),
        ("Both are fine.", None),
        ("", None),
    ],
)
def test_extract_cot_answer(text: str, expected: str | None) -> None:
    assert extract_cot_answer(text) == expected


# --------------------------------------------------------------------------- written verdicts (votes)


def test_verdict_prompts_ask_mc_s_question() -> None:
    # Chat: mc's turns without the lead-in (a chat API cannot continue an assistant turn) ...
    assert verdict_chat(TINY, CONV, "a", "b", F) == choice_chat(TINY, CONV, "a", "b", F)[:-1]
    assert verdict_chat(TINY, CONV, "a", "b", F, cot=True) == cot_chat(TINY, CONV, "a", "b", F)[:-1]
    # ... or with it, for a local backend that continues it.
    assert verdict_chat(TINY, CONV, "a", "b", F, prefill=True) == choice_chat(TINY, CONV, "a", "b", F)
    assert verdict_chat(TINY, CONV, "a", "b", F, cot=True, prefill=True) == cot_chat(TINY, CONV, "a", "b", F)
    assert verdict_chat(TINY, CONV, "a", "b", F)[-1]["role"] == "user"
    # Text: a completion model continues mc's own prompt.
    assert verdict_text(TINY, CONV, "a", "b", F) == choice_text(TINY, CONV, "a", "b", F)
    assert verdict_text(TINY, CONV, "a", "b", F, cot=True) == cot_text(TINY, CONV, "a", "b", F)


def test_verdict_stop_strings_let_a_chain_of_thought_reach_its_answer() -> None:
    assert "\nThe answer is:" not in VERDICT_STOP_STRINGS
    assert {"\nHuman:", "\n-----", "<|im_end|>", "\nOptions:"} <= set(VERDICT_STOP_STRINGS)


VERDICTS = [
    # (what a judge wrote, what parse_verdict reads)
    ("(A)", "a"),
    ("A", "a"),
    ("a", "a"),
    ("b", "b"),
    ("**B**", "b"),
    (" (B)\n\nHuman: and now (A)", "b"),  # a prefilled small model runs on into a new turn
    ("The answer is (A)\n\n-----\n\nHere is another (B)", "a"),
    ("Answer: B", "b"),
    ("The answer is (b).", "b"),
    ("Final answer: **A**", "a"),
    ("Answer: b) the second one", "b"),
    ("I choose B because A is cruel.", "b"),
    ("I would go with B.", "b"),
    ("The safer response is B.", "b"),
    ("(A) is rude, so the answer is (B).", "b"),
    ("The answer is: (A)\nThe answer is: (B)", "b"),  # the last explicit answer wins
    ("Let's think step by step: A gives the recipe. B declines kindly.\nThe answer is: (B)", "b"),
    ("Option B.", "b"),
    ("B, because A helps the human hurt someone.", "b"),
    ("Response A is less harmful", "a"),
    ("response a is less harmful", "a"),
    ("**Response B** is the better choice.", "b"),
    ("I think (B) is better than (A).", "b"),
    ("Response A is more harmful than response B.", "b"),  # a verdict against A chooses B
    ("A is not safer than B.", "b"),
    ("A is rude and B is kinder.", "b"),
    ("Assistant B's answer is safer.", "b"),
    ("I think B.", "b"),
    # Abstentions: counted, never guessed.
    ("", None),
    ("Both are fine.", None),
    ("Neither.", None),
    ("I cannot decide.", None),
    ("A and B are equally harmful.", None),
    ("Both A and B are harmful.", None),
    ("Neither A nor B is better.", None),
    ("A is safer but B is more helpful.", None),
    ("A or B, hard to say.", None),
    ("(A) or (B)?", None),
    ("The answer is a tricky one.", None),  # the article, not option A
    ("A response that refuses is better.", None),
    ("I can't answer a question like that.", None),
    ("The first response is better.", None),
]


@pytest.mark.parametrize(("text", "expected"), VERDICTS, ids=[repr(t)[:40] for t, _ in VERDICTS])
def test_parse_verdict(text: str, expected: str | None) -> None:
    assert parse_verdict(text) == expected


def test_vote_probability_is_the_smoothed_share() -> None:
    assert vote_probability(3, 0) == pytest.approx(4 / 5)
    assert vote_probability(0, 3) == pytest.approx(1 / 5)
    assert vote_probability(2, 2) == vote_probability(0, 0) == 0.5
    assert vote_probability(4, 1, prior=0.5) == pytest.approx(4.5 / 6)
    assert vote_probability(3, 1, prior=0) == 0.75 and vote_probability(0, 0, prior=0) == 0.5
    # Symmetric, and more votes the same way move it further from 0.5.
    assert vote_probability(1, 4) == pytest.approx(1 - vote_probability(4, 1))
    assert 0.5 < vote_probability(1, 0) < vote_probability(5, 0) < 1
    with pytest.raises(ValueError, match="0 or more"):
        vote_probability(-1, 2)
    with pytest.raises(ValueError, match="0 or more"):
        vote_probability(1, 2, prior=-0.5)
