"""Prompt builders for critique/revision and AI feedback. Pure functions, no model calls.

Every builder comes in two forms:

- ``*_chat`` returns a `Chat` for models with a chat template. A chat whose last message is an
  ``assistant`` message asks the backend to *continue* that message (an answer lead-in).
- ``*_text`` returns a plain string for completion models; it ends with the label the model
  completes (``Critique:``, ``Revision:``, ``The answer is:``, ...). Cut the model's output at
  the first of `COMPLETION_STOP_STRINGS`.

`use_chat_format` picks the form for a backend, and `clean_output` cuts what a model wrote at
the first marker of either form (`CHAT_STOP_STRINGS`).

The constitution's few-shot examples always come first and are rendered from the constitution
alone, so every row of a run shares a byte-identical prefix: the backends prefill it once and
reuse its KV cache. Nothing row-specific may ever be placed before or inside that prefix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from cai.backends.base import Backend
from cai.constitution import Constitution, CritiquePrinciple, FeedbackPrinciple
from cai.types import Chat, Message, Role

_SPEAKERS = {"system": "System", "user": "Human", "assistant": "Assistant"}
_INTRO = "Here is a conversation between a human and an AI assistant:"
# Separates few-shot examples in the text forms; rare in real answers, and a stop string.
EXAMPLE_SEPARATOR = "\n\n-----\n\n"
ANSWER_LEAD_IN = "The answer is:"
COT_LEAD_IN = "Let's think step by step:"
CHOICE_OPTIONS = (" (A)", " (B)")
"""The continuations scored after ``The answer is:`` to read the model's preference."""
COMPLETION_STOP_STRINGS = (
    "\nHuman:",
    "\nAssistant:",
    "\nSystem:",
    "\nCritiqueRequest:",
    "\nCritique:",
    "\nRevisionRequest:",
    "\nRevision:",
    "\nThe answer is:",
    "\n-----",
)
"""Where a completion model has finished one field and started inventing the next."""
# Markers of the prompt format (or of a chat template) that mean the model went on to write the
# next turn itself; everything from the first one on is dropped.
CHAT_STOP_STRINGS = (*COMPLETION_STOP_STRINGS, "<|im_start|>", "<|im_end|>", "Human:", "CritiqueRequest:",
                     "RevisionRequest:", "Draft reply:", '"""', "Guideline:")
_LEADING_LABEL = re.compile(r"^\s*(?:critique|revision|assistant|answer|response)\s*:\s*", re.IGNORECASE)


def use_chat_format(prompt_format: str, backend: Backend) -> bool:
    """Whether to build the ``*_chat`` forms: ``chat``, or ``auto`` with a backend that has a chat template.

    Args:
        prompt_format: a stage config's ``prompt_format`` (``auto``, ``chat`` or ``text``).
    """
    if prompt_format == "auto":
        return bool(getattr(backend, "has_chat_template", True))
    return prompt_format == "chat"


def clean_output(text: str, stop: tuple[str, ...] = CHAT_STOP_STRINGS) -> str:
    """Cut at the first role/format marker the model wrote itself, drop a leading label, strip."""
    for marker in stop:
        at = text.find(marker)
        if at != -1:
            text = text[:at]
    return _LEADING_LABEL.sub("", text.strip(), count=1).strip()


def _msg(role: Role, content: str) -> Message:
    return {"role": role, "content": content}


def format_conversation(conversation: Sequence[Message]) -> str:
    """Render a conversation as a labelled transcript.

    Each message becomes ``"<Speaker>: <content>"`` with its content stripped, where the speaker
    is ``Human`` (user), ``Assistant`` or ``System``; messages are joined by a blank line
    (``"\\n\\n"``), e.g. ``"Human: Hi\\n\\nAssistant: Hello!"``. This is the hh-rlhf layout
    without its leading blank line.
    """
    return "\n\n".join(f"{_SPEAKERS[m['role']]}: {m['content'].strip()}" for m in conversation)


def _transcript(conversation: Sequence[Message], response: str) -> str:
    """The conversation followed by the assistant's ``response`` to its last turn."""
    return format_conversation([*conversation, _msg("assistant", response)])


def _show(conversation: Sequence[Message], response: str, request: str) -> str:
    """The chat form's user turn: the conversation, the response, and a request about it."""
    return f"{_INTRO}\n\n{_transcript(conversation, response)}\n\n{request}"


# --------------------------------------------------------------------------- critique / revision


def critique_chat(
    constitution: Constitution, conversation: Chat, response: str, principle: CritiquePrinciple
) -> Chat:
    """Chat asking the model to critique ``response`` (the assistant's reply to ``conversation``).

    Few-shot examples come first, four turns each: user (conversation, response, critique
    request), assistant (critique), user (revision request), assistant (revision). The chat ends
    with the user turn that asks for this row's critique.
    """
    chat: Chat = []
    for ex in constitution.critique_revision_examples:
        chat += [
            _msg("user", _show(ex.conversation, ex.response, ex.critique_request)),
            _msg("assistant", ex.critique),
            _msg("user", ex.revision_request),
            _msg("assistant", ex.revision),
        ]
    chat.append(_msg("user", _show(conversation, response, principle.critique_request)))
    return chat


def revision_chat(critique_chat: Chat, critique: str, principle: CritiquePrinciple) -> Chat:
    """Extend a `critique_chat` with the model's critique and the principle's revision request.

    Raises:
        ValueError: ``critique_chat`` does not end with a user turn (it is not a critique chat).
    """
    if not critique_chat or critique_chat[-1]["role"] != "user":
        raise ValueError("revision_chat expects a chat from critique_chat, which ends with a user turn")
    return [*critique_chat, _msg("assistant", critique.strip()), _msg("user", principle.revision_request)]


def direct_revision_chat(
    constitution: Constitution, conversation: Chat, response: str, principle: CritiquePrinciple
) -> Chat:
    """Chat asking for a revision with no critique first (the paper's no-critique ablation).

    Each few-shot example is two turns: user (conversation, response, revision request) and
    assistant (revision). Ends with the user turn asking for this row's revision.
    """
    chat: Chat = []
    for ex in constitution.critique_revision_examples:
        chat += [
            _msg("user", _show(ex.conversation, ex.response, ex.revision_request)),
            _msg("assistant", ex.revision),
        ]
    chat.append(_msg("user", _show(conversation, response, principle.revision_request)))
    return chat


def critique_text(
    constitution: Constitution, conversation: Chat, response: str, principle: CritiquePrinciple
) -> str:
    """Completion-model form of `critique_chat`; ends with ``"Critique:"``.

    Layout of one block (blocks are joined by `EXAMPLE_SEPARATOR`)::

        Human: ...

        Assistant: <response>

        CritiqueRequest: ...

        Critique: ...

        RevisionRequest: ...

        Revision: ...
    """
    blocks = [
        f"{_transcript(ex.conversation, ex.response)}\n\nCritiqueRequest: {ex.critique_request}"
        f"\n\nCritique: {ex.critique}\n\nRevisionRequest: {ex.revision_request}\n\nRevision: {ex.revision}"
        for ex in constitution.critique_revision_examples
    ]
    row = _transcript(conversation, response)
    blocks.append(f"{row}\n\nCritiqueRequest: {principle.critique_request}\n\nCritique:")
    return EXAMPLE_SEPARATOR.join(blocks)


def revision_text(critique_text: str, critique: str, principle: CritiquePrinciple) -> str:
    """Extend a `critique_text` with the critique and revision request; ends with ``"Revision:"``.

    Raises:
        ValueError: ``critique_text`` does not end with ``"Critique:"``.
    """
    if not critique_text.endswith("Critique:"):
        raise ValueError("revision_text expects a prompt from critique_text, which ends with 'Critique:'")
    return f"{critique_text} {critique.strip()}\n\nRevisionRequest: {principle.revision_request}\n\nRevision:"


def direct_revision_text(
    constitution: Constitution, conversation: Chat, response: str, principle: CritiquePrinciple
) -> str:
    """Completion-model form of `direct_revision_chat`; ends with ``"Revision:"``."""
    blocks = [
        f"{_transcript(ex.conversation, ex.response)}\n\nRevisionRequest: {ex.revision_request}"
        f"\n\nRevision: {ex.revision}"
        for ex in constitution.critique_revision_examples
    ]
    row = _transcript(conversation, response)
    blocks.append(f"{row}\n\nRevisionRequest: {principle.revision_request}\n\nRevision:")
    return EXAMPLE_SEPARATOR.join(blocks)


# --------------------------------------------------------------------------- rewrite (small models)

REWRITE_GUIDE = (
    "You are a helpful, honest and harmless assistant. Below is a draft of your reply to the user's last "
    "message, and a guideline it must follow.\n\nDraft reply:\n\"\"\"\n{draft}\n\"\"\"\n\nGuideline: {guideline}\n\n"
    "Now write your final reply to the user. Speak to the user directly; do not talk about the draft. "
    "Help with everything in the request that is safe, and if part of it is harmful, decline that part "
    "in a sentence, say why, and offer a safe way to meet the need."
)
"""The system turn of rewrite mode: the draft and the principle, then the user's own conversation."""


def rewrite_chat(conversation: Chat, response: str, principle: CritiquePrinciple, lead: str = "") -> Chat:
    """Principle-guided regeneration: the model answers the user again, guided by the principle.

    Small instruct models follow "answer the user" far better than "revise this transcript": asked
    for a revision they often comment on the response instead of writing one. Here the draft and
    the principle's revision request sit in a system turn, and the user's conversation follows
    unchanged, so the model's next turn is simply its reply. No few-shot examples are needed.
    With ``lead``, the reply is prefilled with it and the model continues from there.
    """
    system = REWRITE_GUIDE.format(draft=response.strip(), guideline=principle.revision_request)
    turns = [m for m in conversation if m["role"] != "system"]  # one system turn: ours, which restates the task
    return [_msg("system", system), *turns, *([_msg("assistant", lead)] if lead else [])]


def rewrite_text(conversation: Chat, response: str, principle: CritiquePrinciple, lead: str = "") -> str:
    """Completion-model form of `rewrite_chat`; ends with ``"Assistant:"`` (and ``lead``)."""
    system = REWRITE_GUIDE.format(draft=response.strip(), guideline=principle.revision_request)
    turns = [m for m in conversation if m["role"] != "system"]
    return f"System: {system}\n\n{format_conversation(turns)}\n\nAssistant:{' ' + lead if lead else ''}"


# --------------------------------------------------------------------------- AI feedback


def _question(conversation: Sequence[Message], response_a: str, response_b: str, question: str) -> str:
    """The conversation, the question and the two candidate replies as options (A) and (B)."""
    return (
        f"{_INTRO}\n\n{format_conversation(conversation)}\n\n{question}\n"
        f"Options:\n(A) {response_a.strip()}\n(B) {response_b.strip()}"
    )


def _with_reasoning(reasoning: str) -> str:
    """``COT_LEAD_IN`` followed by the reasoning, cut before any answer the model wrote itself."""
    # Scoring re-asks for the answer after our own lead-in; a copy the model wrote would repeat it.
    reasoning = reasoning.split(ANSWER_LEAD_IN)[0].strip()
    return f"{COT_LEAD_IN} {reasoning}" if reasoning else COT_LEAD_IN


def choice_chat(
    constitution: Constitution, conversation: Chat, response_a: str, response_b: str,
    principle: FeedbackPrinciple,
) -> Chat:
    """Chat for multiple-choice AI feedback: which of two replies to ``conversation`` is better.

    Few-shot examples (``feedback_examples``) come first as user/assistant pairs, the assistant
    answering ``"The answer is: (A)"``. Ends with an assistant lead-in ``"The answer is:"``;
    score `CHOICE_OPTIONS` as its continuation.
    """
    chat: Chat = []
    for ex in constitution.feedback_examples:
        chat += [
            _msg("user", _question(ex.conversation, ex.response_a, ex.response_b, ex.question)),
            _msg("assistant", f"{ANSWER_LEAD_IN} ({ex.answer})"),
        ]
    chat += [
        _msg("user", _question(conversation, response_a, response_b, principle.question)),
        _msg("assistant", ANSWER_LEAD_IN),
    ]
    return chat


def choice_text(
    constitution: Constitution, conversation: Chat, response_a: str, response_b: str,
    principle: FeedbackPrinciple,
) -> str:
    """Completion-model form of `choice_chat`; ends with ``"The answer is:"``."""
    blocks = [
        f"{_question(ex.conversation, ex.response_a, ex.response_b, ex.question)}\n"
        f"{ANSWER_LEAD_IN} ({ex.answer})"
        for ex in constitution.feedback_examples
    ]
    blocks.append(f"{_question(conversation, response_a, response_b, principle.question)}\n{ANSWER_LEAD_IN}")
    return EXAMPLE_SEPARATOR.join(blocks)


def cot_chat(
    constitution: Constitution, conversation: Chat, response_a: str, response_b: str,
    principle: FeedbackPrinciple,
) -> Chat:
    """Chain-of-thought form of `choice_chat`, with ``cot_feedback_examples`` as few-shot turns.

    Ends with the assistant lead-in ``"Let's think step by step:"``; generate the reasoning
    from it, then score the answer with `cot_answer_chat`.
    """
    chat: Chat = []
    for ex in constitution.cot_feedback_examples:
        chat += [
            _msg("user", _question(ex.conversation, ex.response_a, ex.response_b, ex.question)),
            _msg("assistant", f"{_with_reasoning(ex.reasoning)}\n{ANSWER_LEAD_IN} ({ex.answer})"),
        ]
    chat += [
        _msg("user", _question(conversation, response_a, response_b, principle.question)),
        _msg("assistant", COT_LEAD_IN),
    ]
    return chat


def cot_answer_chat(cot_chat: Chat, reasoning: str) -> Chat:
    """Replace the lead-in of a `cot_chat` with the reasoning plus the ``"The answer is:"`` lead-in.

    Anything from ``"The answer is:"`` on in ``reasoning`` is dropped, so the answer is asked once.

    Raises:
        ValueError: ``cot_chat`` does not end with the chain-of-thought lead-in.
    """
    if not cot_chat or cot_chat[-1] != _msg("assistant", COT_LEAD_IN):
        raise ValueError(f"cot_answer_chat expects a chat from cot_chat, which ends with {COT_LEAD_IN!r}")
    return [*cot_chat[:-1], _msg("assistant", f"{_with_reasoning(reasoning)}\n{ANSWER_LEAD_IN}")]


def cot_text(
    constitution: Constitution, conversation: Chat, response_a: str, response_b: str,
    principle: FeedbackPrinciple,
) -> str:
    """Completion-model form of `cot_chat`; ends with ``"Let's think step by step:"``."""
    blocks = [
        f"{_question(ex.conversation, ex.response_a, ex.response_b, ex.question)}\n"
        f"{_with_reasoning(ex.reasoning)}\n{ANSWER_LEAD_IN} ({ex.answer})"
        for ex in constitution.cot_feedback_examples
    ]
    blocks.append(f"{_question(conversation, response_a, response_b, principle.question)}\n{COT_LEAD_IN}")
    return EXAMPLE_SEPARATOR.join(blocks)


def cot_answer_text(cot_text: str, reasoning: str) -> str:
    """Completion-model form of `cot_answer_chat`; ends with ``"The answer is:"``.

    Raises:
        ValueError: ``cot_text`` does not end with the chain-of-thought lead-in.
    """
    if not cot_text.endswith(COT_LEAD_IN):
        raise ValueError(f"cot_answer_text expects a prompt from cot_text, which ends with {COT_LEAD_IN!r}")
    return f"{cot_text[: -len(COT_LEAD_IN)]}{_with_reasoning(reasoning)}\n{ANSWER_LEAD_IN}"


# Only an upper-case letter counts, so "the answer is a tricky one" is not read as (A).
_ANSWER_IS = re.compile(r"(?i:answer is)\s*:?\s*(?:\(([AB])\)|([AB])\b)")
_VERDICT = re.compile(
    r"\(([AB])\)\s+is\s+(?:clearly\s+)?(?:the\s+)?"
    r"(?:better|less harmful|safer|preferable|more (?:helpful|harmless|ethical|appropriate))"
)


def extract_cot_answer(text: str) -> str | None:
    """The option a chain-of-thought names as its answer, or None when it names none clearly.

    Looks for the last ``answer is (A)`` / ``answer is B``; failing that, a verdict such as
    ``(B) is less harmful`` when all such verdicts agree.
    """
    found = _ANSWER_IS.findall(text)
    if found:
        last = found[-1]
        return last[0] or last[1]
    verdicts = set(_VERDICT.findall(text))
    return verdicts.pop() if len(verdicts) == 1 else None
