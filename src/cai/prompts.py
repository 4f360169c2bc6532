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
from typing import Literal

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


# --------------------------------------------------------------------------- RLCD contrast answers


def with_system_turn(conversation: Chat, text: str) -> Chat:
    """``conversation`` answered under ``text`` as its system turn.

    A system turn the conversation already has is kept, after ``text``, so the user's own
    instructions still reach the model and ``text`` stays the shared first bytes of every prompt.
    """
    if conversation and conversation[0]["role"] == "system":
        first = _msg("system", f"{text}\n\n{conversation[0]['content']}")
        return [first, *conversation[1:]]
    return [_msg("system", text), *conversation]


def contrast_chat(conversation: Chat, statement: str) -> Chat:
    """``conversation`` with an RLCD statement (`cai.constitution.RlcdStatements`) as its system turn.

    The model answers the user's conversation as usual, under an instruction to follow (or to
    violate) a principle. A system turn the conversation already has is kept, after the statement.
    """
    return with_system_turn(conversation, statement)


# --------------------------------------------------------------------------- distill baseline

DISTILL_GUIDE = (
    "You are a helpful, honest and harmless assistant. Reply to the user directly. Your reply must "
    "already meet every guideline below; each one says how a reply is made better, so apply it to your "
    "own reply as you write it, and do not mention the guidelines.\n\n{guidelines}\n\n"
    "Help with everything in the request that is safe. If part of it is harmful, decline that part in a "
    "sentence, say why, and offer a safe way to meet the need."
)
"""The distill baseline's default system turn; ``{guidelines}`` is the constitution's revision requests, listed."""


def distill_system(constitution: Constitution) -> str:
    """The system turn a critic answers under in the distill baseline: its critique principles' revision
    requests as a bulleted list (what SL-CAI's revisions aim at, asked for up front)."""
    guidelines = "\n".join(f"- {p.revision_request.strip()}" for p in constitution.critique_revision_principles)
    return DISTILL_GUIDE.format(guidelines=guidelines)


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


# --------------------------------------------------------------------------- written verdicts (votes)
# For judges whose server returns no log-probabilities: the judge sees the same question as `mc`
# and *writes* its answer, which `parse_verdict` reads. Several sampled verdicts per question make
# a vote, and `vote_probability` turns the vote into a probability.

VERDICT_STOP_STRINGS = (*(s for s in CHAT_STOP_STRINGS if s != "\nThe answer is:"), "\nOptions:")
"""Where a written verdict has ended: every marker of `CHAT_STOP_STRINGS` (a new turn, a new
example) except the answer lead-in, which a chain of thought writes before its answer, plus the
start of a new question's options."""


def verdict_chat(
    constitution: Constitution, conversation: Chat, response_a: str, response_b: str,
    principle: FeedbackPrinciple, *, cot: bool = False, prefill: bool = False,
) -> Chat:
    """Chat asking the judge to write which of two replies is better: `mc`'s question, answered in words.

    The turns are those of `choice_chat` (``cot=False``) or `cot_chat` (``cot=True``), so the
    few-shot prefix is shared with ``mc`` and ``mc-cot``; the examples' answers
    (``"The answer is: (A)"``, after the reasoning with ``cot``) show the judge the form to write.

    Args:
        cot: reason first; the judge writes its reasoning and then its answer in one reply.
        prefill: keep the assistant lead-in (``"The answer is:"``, or ``"Let's think step by step:"``
            with ``cot``) for the judge to continue. Local backends can continue an assistant turn;
            most chat APIs cannot, so by default the chat ends with the user's question.

    Generate with stop strings `VERDICT_STOP_STRINGS` and read the reply with `parse_verdict`.
    """
    build = cot_chat if cot else choice_chat
    chat = build(constitution, conversation, response_a, response_b, principle)
    return chat if prefill else chat[:-1]


def verdict_text(
    constitution: Constitution, conversation: Chat, response_a: str, response_b: str,
    principle: FeedbackPrinciple, *, cot: bool = False,
) -> str:
    """Completion-model form of `verdict_chat`: the prompt of `choice_text` (or `cot_text` with ``cot``).

    A completion model always continues the lead-in, so the prompt is exactly ``mc``'s; here the
    judge's continuation is generated and read with `parse_verdict` instead of being scored.
    """
    return (cot_text if cot else choice_text)(constitution, conversation, response_a, response_b, principle)


Verdict = Literal["a", "b"]
"""What `parse_verdict` reads: the first option (``"a"``) or the second (``"b"``)."""
_OPTION: dict[str, Verdict] = {"A": "a", "a": "a", "B": "b", "b": "b"}
_OTHER: dict[Verdict, Verdict] = {"a": "b", "b": "a"}
# A letter naming an option: "(A)", "(b)", a bare capital "A"/"B", or a bare small "a"/"b" that ends
# its clause ("answer: b."). `_is_article` rejects the English article in "A response that ...".
_LETTER = r"(?:\((?P<paren>[ABab])\)|(?<!\w)(?P<upper>[AB])(?!\w)|(?<!\w)(?P<lower>[ab])(?=\s*(?:$|[.,;:!?)\]])))"
_QUALIFIED = re.compile(
    r"(?i:(?:response|option|assistant|reply|candidate|choice)\s+)"
    r"(?:\((?P<paren>[ABab])\)|(?P<upper>[ABab])(?!\w))"
)
_BARE = re.compile(_LETTER)
# The words that may follow a bare "A" naming an option ("A is safer", "A and B"); any other
# lower-case word after it makes it the article ("A response that ...").
_AFTER_LETTER = frozenset(
    "is was seems looks appears would does gives has wins and or because since as vs versus than over "
    "instead better".split()
)
_NEXT_WORD = re.compile(r"\s+([a-z]+)")
# Tier 1, an explicit answer: "the answer is B", "Answer: (a)", "I choose B", "I'd go with A",
# "The less harmful response is B", "Final verdict: A". The letter must follow the phrase at once.
_EXPLICIT = re.compile(
    r"(?i:\b(?:answer|verdict|choice|decision|pick)\s*(?:is|would be|:|-)"
    r"|\b(?:choose|chose|pick|select|prefer|go with|going with|vote for|opt for)"
    r"|\b(?:response|option|one|reply)\s+(?:is|would be))"
    r"\s*:?\s*"
)
# Tier 3, a verdict about one option: "(B) is better", "Response A is less harmful", "A is more
# harmful" (which prefers the other), "B is not safer" (negated: the other).
_GOOD = (r"(?:the\s+)?(?:better|best|safer|preferable|preferred|right|correct|wiser|kinder)\b"
         r"|less\s+(?:harmful|dangerous|toxic|risky|problematic|offensive|unsafe|unethical|evasive|preachy)"
         r"|more\s+(?:helpful|harmless|ethical|appropriate|honest|responsible|careful|respectful|caring|accurate)")
_BAD = (r"(?:more\s+(?:harmful|dangerous|toxic|risky|problematic|offensive|unethical|evasive|preachy)"
        r"|less\s+(?:helpful|harmless|safe|ethical|appropriate|honest|accurate)"
        r"|worse|harmful|dangerous|unsafe|inappropriate|unethical|toxic|offensive)\b")
_JUDGED = re.compile(
    r"\s+(?:is|seems|looks|appears|would be|was)\s+(?P<neg>not\s+)?"
    r"(?:(?:clearly|much|far|slightly|definitely|somewhat|a\s+bit|a\s+lot|the|a)\s+)?"
    rf"(?:(?P<good>{_GOOD})|(?P<bad>{_BAD}))",
    re.IGNORECASE,
)
_NOT_A_SUBJECT = re.compile(r"(?i:\b(?:neither|nor|both)\s+)$")
# Tier 4, an abstention said in words.
_ABSTAIN = re.compile(
    r"(?i:\bneither\b|\bboth\b|\btie\b|\btied\b|\bequally\b|\bunsure\b|\bnot sure\b|\bit depends\b"
    r"|\b(?:cannot|can't|can not|unable to|couldn't)\s+(?:decide|tell|choose|say|determine|pick)"
    r"|\bno\s+(?:clear\s+)?(?:preference|difference|winner)\b|\bhard to (?:say|tell|decide)\b)"
)
# The opening answer of tier 2 ends its clause: "(A)", "B.", "B, because ...", "A: ...", "**B**".
_ANSWER_ENDS = re.compile(r"\s*(?:$|[\n.,;:!)\-]|because\b|since\b)")
_MARKDOWN = re.compile(r"[*_`#>\"]+")


def _letter_tokens(text: str) -> list[tuple[int, int, Verdict]]:
    """Every option letter in ``text`` as ``(start, end, "a" | "b")``, in order, articles left out."""
    found: dict[int, tuple[int, int, Verdict]] = {}
    for pattern in (_QUALIFIED, _BARE):
        for m in pattern.finditer(text):
            letter = next(g for g in m.groups() if g)  # the one letter group that matched
            bare = m.group("paren") is None
            if bare and letter in "Aa" and _is_article(text, m.end()):
                continue
            start = m.start()
            if not any(s <= start < e for s, e, _ in found.values()):
                found[start] = (start, m.end(), _OPTION[letter])
    return [found[s] for s in sorted(found)]


def _is_article(text: str, end: int) -> bool:
    nxt = _NEXT_WORD.match(text, end)
    return nxt is not None and nxt.group(1) not in _AFTER_LETTER


def parse_verdict(text: str) -> Verdict | None:
    """The option a written verdict chooses: ``"a"``, ``"b"``, or None for an abstention.

    Reads the messy replies of small and chat models alike (case, markdown, trailing text). The
    text is first cut at the first marker of a new turn or example (`VERDICT_STOP_STRINGS`) and
    stripped of markdown; then the first rule that applies decides:

    1. An explicit answer, the last one if several: ``"The answer is (b)."``, ``"Answer: B"``,
       ``"I choose B because A ..."``, ``"I'd go with A"``, ``"The safer response is B"``.
    2. An opening answer: the reply begins with one option that ends its clause: ``"(A)"``,
       ``"B."``, ``"**B**"``, ``"B, because A ..."``, ``"Response A: ..."``.
    3. Verdicts about options: ``"Response A is less harmful"``, ``"(B) is better than (A)"``,
       ``"A is more harmful"`` (which chooses B). All must agree, or it is None
       (``"A is safer but B is more helpful"``).
    4. An abstention in words: ``both``, ``neither``, ``equally``, ``tie``, ``I cannot decide``,
       ``not sure``, ``no preference``, ``it depends``: None.
    5. The only option the reply names (``"I think B."``); None when it names both or neither.

    A bare capital ``A`` followed by an ordinary word (``"A response that refuses ..."``) is the
    article, not an option; a bare small ``a``/``b`` counts only where it ends a clause.

    Returns:
        ``"a"`` (the first option), ``"b"`` (the second), or None: an abstention, to be counted,
        never guessed.
    """
    for marker in VERDICT_STOP_STRINGS:
        at = text.find(marker)
        if at != -1:
            text = text[:at]
    text = _MARKDOWN.sub("", text).strip()
    tokens = _letter_tokens(text)
    if not tokens:
        return None
    by_start = {start: letter for start, _, letter in tokens}

    explicit = [by_start[m.end()] for m in _EXPLICIT.finditer(text) if m.end() in by_start]
    if explicit:
        return explicit[-1]

    start, end, letter = tokens[0]
    if start == 0 and _ANSWER_ENDS.match(text, end):
        return letter

    judged: set[Verdict] = set()
    for start, end, letter in tokens:
        m = _JUDGED.match(text, end)
        if m is None or _NOT_A_SUBJECT.search(text[:start]):
            continue
        prefers = (m.group("good") is not None) != (m.group("neg") is not None)
        judged.add(letter if prefers else _OTHER[letter])
    if judged:
        return judged.pop() if len(judged) == 1 else None

    if _ABSTAIN.search(text):
        return None
    named = {letter for _, _, letter in tokens}
    return named.pop() if len(named) == 1 else None


def vote_probability(a_votes: int, b_votes: int, prior: float = 1.0) -> float:
    """P(first option better) from a vote of written verdicts: the smoothed share ``(a + prior) / (a + b + 2 prior)``.

    The prior adds ``prior`` imaginary votes to each side (Laplace smoothing with the default 1), so
    a unanimous vote of 3 gives 0.8 rather than certainty and a soft label keeps a measure of how
    much the vote says. Abstentions are not votes: leave them out of both counts.

    Args:
        a_votes: verdicts for the first option (``parse_verdict`` gave ``"a"``).
        b_votes: verdicts for the second option.
        prior: imaginary votes per side, >= 0; 0 gives the raw share.

    Returns:
        A probability in [0, 1]; 0.5 when there are no votes and no prior (no evidence either way).

    Raises:
        ValueError: a negative count or prior.
    """
    if a_votes < 0 or b_votes < 0 or prior < 0:
        raise ValueError(f"vote counts and prior must be 0 or more, not a={a_votes}, b={b_votes}, prior={prior}")
    total = a_votes + b_votes + 2 * prior
    return 0.5 if total == 0 else (a_votes + prior) / total
