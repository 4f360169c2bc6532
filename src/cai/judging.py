"""How a judge's preference between two answers is read: one function per judging method.

Every method answers the same multiple-choice question (`cai.prompts.choice_chat`: the
conversation, a principle's question, options (A) and (B), and the lead-in ``The answer is:``)
and returns P(first option) for each question, or None where the judge abstained:

- ``mc``: the log-probabilities of ``" (A)"`` and ``" (B)"`` as the continuation, normalised over
  the two (the paper's method). Needs a backend that scores text (hf, vllm, an OpenAI-compatible
  server with log-probs on either route).
- ``mc-cot``: the judge first writes a chain of thought, then ``mc`` reads the answer after it
  (the label stage clamps those probabilities, which are overconfident).
- ``votes``: for servers that return no log-probabilities: the judge *writes* its verdict N times
  (sampled, after an optional chain of thought); `cai.prompts.parse_verdict` reads each, and the
  smoothed share of votes for the first option is the probability. A verdict that names neither
  option is an abstention: counted, never guessed; a question whose every verdict abstains is one.

The fourth method, ``rlcd``, asks no judge: its pairs are preferred by construction when they are
sampled (`cai.stages.sample`), so it has nothing to read here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal, Sequence

from cai import prompts as P
from cai.backends.base import Backend, stable_seed
from cai.config import LabelConfig
from cai.constitution import Constitution, FeedbackPrinciple
from cai.errors import CaiError, NoChoiceInTopLogprobs
from cai.types import Chat

JudgeMethod = Literal["mc", "mc-cot", "votes"]
JUDGE_METHODS: tuple[JudgeMethod, ...] = ("mc", "mc-cot", "votes")
"""The methods that ask a judge, cheapest first (the order `auto` breaks ties in)."""


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def logit(p: float, eps: float = 1e-6) -> float:
    p = min(max(p, eps), 1 - eps)
    return math.log(p / (1 - p))


def combine_orders(p_first: dict[str, float]) -> float:
    """P(A better) from the per-order P(first option): average in log-odds space (an order the judge
    abstained on, None, is left out; the caller makes sure one is left).

    With a constant position bias b (in log-odds), P_ab = sigmoid(d + b) and P_ba = sigmoid(-d + b)
    for a true preference d; the average of logit(P_ab) and -logit(P_ba) is exactly d.
    """
    terms = []
    if p_first.get("ab") is not None:
        terms.append(logit(p_first["ab"]))
    if p_first.get("ba") is not None:
        terms.append(-logit(p_first["ba"]))
    return sigmoid(sum(terms) / len(terms))


def first_option_probability(logprob_a: float, logprob_b: float) -> float | None:
    """P(first option) from the two options' log-probabilities, normalised over the two.

    None (an abstention) when neither is known: a chat server whose top log-probs hold neither.
    """
    if not math.isfinite(logprob_a) and not math.isfinite(logprob_b):
        return None
    if not math.isfinite(logprob_a):
        return 0.0
    if not math.isfinite(logprob_b):
        return 1.0
    return sigmoid(logprob_a - logprob_b)


class Question:
    """One multiple-choice question: a conversation, two answers in the order asked, a principle.

    ``key`` names it for seeds (pair id, principle index, order), so a resumed run samples the same.
    """

    __slots__ = ("conversation", "first", "second", "principle", "key")

    def __init__(self, conversation: Chat, first: str, second: str, principle: FeedbackPrinciple, key: tuple) -> None:
        self.conversation, self.first, self.second, self.principle, self.key = conversation, first, second, principle, key


def ask(
    method: JudgeMethod,
    questions: Sequence[Question],
    *,
    constitution: Constitution,
    backend: Backend,
    config: LabelConfig,
    chat: bool,
    seed: int,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[float | None], list[Any]]:
    """P(first option) for every question by ``method`` (None: the judge abstained), and what it wrote.

    Returns:
        ``(probabilities, notes)``: ``notes[i]`` is the chain of thought (``mc-cot``), the list of
        parsed votes (``votes``: ``"a"``, ``"b"`` or None each) or None (``mc``).
    """
    if method == "votes":
        return _votes(questions, constitution, backend, config, chat, seed, progress)
    if method == "mc-cot":
        prompts, notes = _reasoned(questions, constitution, backend, config, chat, seed, progress, "cot")
    elif method == "mc":
        build = P.choice_chat if chat else P.choice_text
        prompts = [build(constitution, q.conversation, q.first, q.second, q.principle) for q in questions]
        notes = [None] * len(questions)
    else:
        raise CaiError(f"unknown judging method '{method}'; choose one of {', '.join(JUDGE_METHODS)}")
    return [first_option_probability(a, b) for a, b in choice_logprobs(backend, prompts)], notes


def choice_logprobs(backend: Backend, prompts: Sequence[Any]) -> list[list[float]]:
    """Log-probs of `cai.prompts.CHOICE_OPTIONS` after each prompt: rendered text where the backend
    can render it, else the chat itself (a chat server applies its own template)."""
    rendered = [_render_or_keep(backend, p) for p in prompts]
    try:
        return backend.choice_logprobs(rendered, list(P.CHOICE_OPTIONS))
    except NoChoiceInTopLogprobs as err:  # some questions had neither option among the server's top log-probs
        return err.scores  # [-inf, -inf] there: abstentions (`first_option_probability`)


def _render_or_keep(backend: Backend, prompt: Any) -> Any:
    """Render a chat locally where the backend can; a chat server without a local template gets the chat."""
    if isinstance(prompt, str) or getattr(backend, "can_render_chats", True):
        return backend.render(prompt)
    return prompt


def _reasoned(questions, constitution, backend, config, chat, seed, progress, tag) -> tuple[list[Any], list[str]]:
    """The chain-of-thought prompts of ``questions`` continued by the judge's own reasoning, then the answer lead-in."""
    build = P.cot_chat if chat else P.cot_text
    cot_prompts = [build(constitution, q.conversation, q.first, q.second, q.principle) for q in questions]
    seeds = [stable_seed(seed, q.key[0], tag, *q.key[1:]) for q in questions]
    texts = backend.generate(cot_prompts, config.cot_sampling.params(), seeds=seeds, progress=progress)
    reasoning = [P.clean_output(t) for t in texts]
    follow = P.cot_answer_chat if chat else P.cot_answer_text
    return [follow(p, r) for p, r in zip(cot_prompts, reasoning)], reasoning


def _votes(questions, constitution, backend, config, chat, seed, progress) -> tuple[list[float | None], list[Any]]:
    """``config.votes`` sampled verdicts per question, each read by `cai.prompts.parse_verdict`.

    A local backend continues the answer's lead-in (``The answer is:``); a chat server, which
    cannot continue an assistant turn everywhere, gets the question as the last user turn.
    """
    cot = config.vote_cot
    prefill = getattr(backend, "can_render_chats", True)
    if chat:
        prompts = [P.verdict_chat(constitution, q.conversation, q.first, q.second, q.principle, cot=cot, prefill=prefill)
                   for q in questions]
    else:
        prompts = [P.verdict_text(constitution, q.conversation, q.first, q.second, q.principle, cot=cot)
                   for q in questions]
    n = config.votes
    sampling = config.vote_sampling
    extra = config.cot_sampling.max_new_tokens if cot else 0  # the reasoning comes first, in the same reply
    if chat and not prefill:
        extra += 24  # a reply not started for the judge ("The answer is: (B), because ...") needs room to name it
    if extra:
        sampling = sampling.model_copy(update={"max_new_tokens": sampling.max_new_tokens + extra})
    params = sampling.model_copy(update={"stop": list(dict.fromkeys((*sampling.stop, *P.VERDICT_STOP_STRINGS)))}).params()
    seeds = [stable_seed(seed, q.key[0], "vote", *q.key[1:], v) for q in questions for v in range(n)]
    texts = backend.generate([p for p in prompts for _ in range(n)], params, seeds=seeds, progress=progress)
    probabilities: list[float | None] = []
    notes: list[Any] = []
    for i in range(len(questions)):
        votes = [P.parse_verdict(t) for t in texts[i * n:(i + 1) * n]]
        a, b = votes.count("a"), votes.count("b")
        probabilities.append(P.vote_probability(a, b) if a + b else None)
        notes.append(votes)
    return probabilities, notes
