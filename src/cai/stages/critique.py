"""The SL-CAI data stage: answer red-team prompts, then critique and revise, N rounds.

For each prompt the helpful model writes an initial response. Then, each round, a principle is
drawn from the constitution (seeded by the row id, so reruns draw the same ones), the critic
writes a critique of the latest response against it, and a revision. Each round's prompt starts
with the constitution's few-shot examples, identical for every row, so the backend computes
their KV cache once and reuses it.

Rows are processed in chunks: every step (initial answers, critiques, revisions) is one batched
``generate`` call over the chunk, and the chunk's rows are appended to ``data.jsonl`` when it
finishes. A killed run loses at most the chunk in flight; a rerun skips the ids already written.
Revisions are fresh prompts showing the latest response (not one ever-growing transcript), which
keeps prompts inside a small model's context.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cai import prompts as P
from cai.backends import load_backend
from cai.backends.base import Backend, stable_seed
from cai.config import CritiqueConfig, LabelConfig, RunConfig, SamplingConfig
from cai.constitution import Constitution, CritiquePrinciple, sample_critique_principles, sample_feedback_principles
from cai.constitution_yaml import load_constitution
from cai.data import PromptRow
from cai.data.prompt_sets import fit_prompt_set, load_prompt_set
from cai.io import JsonlWriter, iter_batches, read_jsonl
from cai.judging import Question, ask, combine_orders
from cai.progress import progress_bar
from cai.runs import StageRun
from cai.sharding import shard_rows
from cai.stages.sample import sample_responses
from cai.types import SamplingParams

@dataclass
class Trace:
    """One prompt's full critique/revision trace as it is built (becomes one output row)."""

    row: PromptRow
    principles: list[CritiquePrinciple]
    initial: str = ""
    rounds: list[dict[str, Any]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: {"initial_s": 0.0, "critique_s": 0.0, "revision_s": 0.0})

    @property
    def current(self) -> str:
        return self.rounds[-1]["revision"] if self.rounds else self.initial

    def to_row(self) -> dict[str, Any]:
        final = self.current
        return {
            "id": self.row.id,
            "category": self.row.category,
            "split": self.row.split,
            "prompt": self.row.messages,
            "initial_response": self.initial,
            "rounds": self.rounds,
            "final_response": final,
            "flags": self.flags,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            # Ready for TRL's SFTTrainer (conversational "messages" format).
            "messages": [*self.row.messages, {"role": "assistant", "content": final}],
        }


def is_degenerate(text: str) -> bool:
    """Empty, almost no words, or looping: not usable as a revision.

    Looping = at least 12 words of which under 25% are distinct, a line of 3+ words repeated 3+ times,
    or 4+ sentences of which under 60% are distinct.
    """
    words = re.findall(r"\w+", text.lower())
    if len(words) < 2:
        return True
    if len(words) >= 12 and len(set(words)) / len(words) < 0.25:
        return True
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(lines.count(line) >= (3 if len(line.split()) >= 3 else 4) for line in set(lines)):
        return True
    sentences = [x.strip().lower() for x in re.split(r"(?<=[.!?])\s+", text) if len(x.split()) >= 4]
    return len(sentences) >= 4 and len(set(sentences)) / len(sentences) < 0.6


_META = re.compile(r"^\s*(?:the|this|your|my)\s+(?:(?:assistant'?s?|ai'?s?)\s+)?(?:last\s+|original\s+|previous\s+)?"
                   r"(?:response|answer|reply)\b|^\s*the\s+assistant\b", re.IGNORECASE)


def is_meta_revision(text: str) -> bool:
    """A "revision" that talks about the response instead of being one ("The response highlights...").

    Small models often do this; training on it would teach the model to comment, not to answer.
    """
    return bool(_META.match(text))


def copies_an_example(text: str, constitution: Constitution) -> bool:
    """True when the text repeats a few-shot example's answer (small models often parrot the prompt)."""
    head = " ".join(text.split()[:12]).lower()
    if len(head) < 20:
        return False
    examples = constitution.critique_revision_examples
    return any(head in " ".join(t.split()).lower() for ex in examples for t in (ex.revision, ex.response, ex.critique))


def _params(sampling: SamplingConfig, extra_stop: tuple[str, ...]) -> SamplingParams:
    params = sampling.params()
    return SamplingParams(
        max_new_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p,
        top_k=params.top_k, seed=params.seed, stop=tuple(dict.fromkeys((*params.stop, *extra_stop))),
    )


def run_critique_revision(
    rows: list[PromptRow],
    *,
    constitution: Constitution,
    backend: Backend,
    critic: Backend | None = None,
    config: CritiqueConfig,
    out_path: str | Path,
    seed: int = 0,
    show_progress: bool = True,
    on_chunk: Any = None,
    judging: LabelConfig | None = None,
) -> list[dict[str, Any]]:
    """Run critique/revision for every row not yet in ``out_path``; return all rows written.

    Args:
        rows: red-team prompts (chats ending with a user turn) with stable ids.
        constitution: principles and few-shot examples.
        backend: the helpful model that writes initial responses.
        critic: the model that critiques and revises (``backend`` when None).
        config: rounds, sampling per step, prompt format, chunk size.
        out_path: ``data.jsonl``; appended to, one row per finished prompt.
        seed: base seed for principle draws and sampling (combined with each row id).
        on_chunk: called with the number of rows written after each chunk (for manifests).
        judging: votes and chain-of-thought settings for ``config.accept: judge`` (default: `LabelConfig`'s;
            the stage keeps them fixed so that the label section never changes what critique computed).
    """
    critic = critic or backend
    chat = P.use_chat_format(config.prompt_format, critic)
    done = {r["id"] for r in read_jsonl(out_path, repair=True)}
    todo = [r for r in rows if r.id not in done]
    response_params = _params(config.response, P.CHAT_STOP_STRINGS)
    critique_params = _params(config.critique_sampling, P.CHAT_STOP_STRINGS)
    revision_params = _params(config.revision_sampling, P.CHAT_STOP_STRINGS)
    with JsonlWriter(out_path) as writer, progress_bar("critique/revision", len(todo), enabled=show_progress) as advance:
        tokens = lambda _rows, n: advance(0, n)  # noqa: E731  (tokens/s while a chunk is in flight)
        for chunk in iter_batches(todo, config.chunk_size):
            traces = [Trace(row, sample_critique_principles(constitution, config.rounds, seed, row.id)) for row in chunk]
            _initial_responses(traces, backend, response_params, seed, tokens)
            for r in range(config.rounds):
                _one_round(traces, r, constitution, critic, chat, config, critique_params, revision_params,
                           seed, tokens, judging or LabelConfig())
            for t in traces:
                writer.write(t.to_row())
            advance(len(chunk), 0)
            if on_chunk is not None:
                on_chunk(len(chunk))
    return read_jsonl(out_path)


def _timed_generate(backend: Backend, prompts: list, params: SamplingParams, seeds: list[int],
                    progress: Any) -> tuple[list[str], float]:
    start = time.perf_counter()
    out = backend.generate(prompts, params, seeds=seeds, progress=progress)
    return out, (time.perf_counter() - start) / max(len(prompts), 1)


def _initial_responses(traces: list[Trace], backend: Backend, params: SamplingParams, seed: int, progress: Any) -> None:
    texts, per_row = _timed_generate(
        backend, [t.row.messages for t in traces], params, [stable_seed(seed, t.row.id, "initial") for t in traces],
        progress,
    )
    for t, text in zip(traces, texts):
        t.initial = P.clean_output(text)
        t.timings["initial_s"] += per_row
        if not t.initial:
            t.flags.append("empty_initial_response")


def _one_round(
    traces: list[Trace], r: int, constitution: Constitution, critic: Backend, chat: bool, config: CritiqueConfig,
    critique_params: SamplingParams, revision_params: SamplingParams, seed: int, progress: Any,
    judging: LabelConfig,
) -> None:
    """Round ``r`` (0-based) for a chunk: one batched critique call (in the paper's mode), then one
    batched revision call with ``config.candidates`` samples per row; each row keeps its first
    candidate that passes `revision_problem` (with ``accept: judge``, the passing candidate the
    judge prefers most, if it prefers it to the previous answer), or its previous answer."""
    critiques = [""] * len(traces)
    if config.mode == "critique_revision":
        build = P.critique_chat if chat else P.critique_text
        critique_prompts = [build(constitution, t.row.messages, t.current, t.principles[r]) for t in traces]
        texts, per_row = _timed_generate(
            critic, critique_prompts, critique_params,
            [stable_seed(seed, t.row.id, "critique", r) for t in traces], progress,
        )
        critiques = [P.clean_output(x) for x in texts]
        next_step = P.revision_chat if chat else P.revision_text
        revision_prompts = [next_step(p, c, t.principles[r]) for p, c, t in zip(critique_prompts, critiques, traces)]
        for t, c in zip(traces, critiques):
            t.timings["critique_s"] += per_row
            if not c:
                t.flags.append(f"round{r + 1}:empty_critique")
    elif config.mode == "revision":
        build = P.direct_revision_chat if chat else P.direct_revision_text
        revision_prompts = [build(constitution, t.row.messages, t.current, t.principles[r]) for t in traces]
    else:
        build = P.rewrite_chat if chat else P.rewrite_text
        revision_prompts = [build(t.row.messages, t.current, t.principles[r], config.rewrite_lead) for t in traces]
    n = config.candidates
    # Candidate 0 keeps the seed a single-candidate run uses, so candidates=1 is the plain method.
    seeds = [stable_seed(seed, t.row.id, "revision", r, *([c] if c else [])) for t in traces for c in range(n)]
    texts, per_row = _timed_generate(critic, [p for p in revision_prompts for _ in range(n)], revision_params, seeds,
                                     progress)
    checked: list[tuple[list[str], list[str | None]]] = []
    for i, (t, critique) in enumerate(zip(traces, critiques)):
        candidates = [P.clean_output(x) for x in texts[i * n:(i + 1) * n]]
        if config.mode == "rewrite" and config.rewrite_lead:  # the prefilled lead-in is part of the reply
            candidates = [f"{config.rewrite_lead.strip()} {c}".strip() if c else "" for c in candidates]
        checked.append((candidates, [revision_problem(c, previous=t.current, critique=critique, constitution=constitution)
                                     for c in candidates]))
    verdicts = (_judge_revisions(traces, checked, r, constitution, critic, chat, config.accept_method, judging, seed)
                if config.accept == "judge" else {})
    for i, (t, critique, (candidates, problems)) in enumerate(zip(traces, critiques, checked)):
        # An abstention counts as indifferent: the candidate stands on the checks alone.
        preference = {k: 0.5 if verdicts.get((i, k)) is None else verdicts[(i, k)] for k in range(len(candidates))}
        for k, problem in enumerate(problems):
            if problem is None and verdicts.get((i, k)) is not None and preference[k] <= 0.5:
                problems[k] = "judge_rejected"  # passed the checks, but the judge prefers the previous answer
        passing = [k for k, problem in enumerate(problems) if problem is None]
        # The judge's favourite where it was asked (the first on a tie), else the first that passed.
        pick = max(passing, key=lambda k: (preference[k], -k)) if passing else 0
        revision, problem = candidates[pick], problems[pick]
        kept_previous = problem is not None
        if kept_previous:
            # Never drop the row or train on junk: keep the last good response and say so.
            t.flags.append(f"round{r + 1}:{problem}_revision")
        t.rounds.append({
            "round": r + 1,
            "principle_id": t.principles[r].id,
            "critique": critique if config.mode == "critique_revision" else None,
            "revision": t.current if kept_previous else revision,
            "raw_revision": revision,
            "kept_previous": kept_previous,
            "candidates_tried": n,
            "rejected_candidates": [p for p in problems if p is not None],
            **({"judge_p_revision_better": verdicts.get((i, pick))} if config.accept == "judge" else {}),
        })
        t.timings["revision_s"] += per_row * n


def _judge_revisions(
    traces: list[Trace], checked: list[tuple[list[str], list[str | None]]], r: int, constitution: Constitution,
    judge: Backend, chat: bool, method: str, judging: LabelConfig, seed: int,
) -> dict[tuple[int, int], float | None]:
    """P(candidate is better than the answer it would replace) for every candidate that passed the
    checks, keyed (row, candidate): one batched call by the judging protocol (`cai.judging.ask`),
    both orders combined in log-odds as the label stage does, under a feedback principle drawn per row and round. None: abstained."""
    questions: list[Question] = []
    keys: list[tuple[int, int]] = []
    for i, (t, (candidates, problems)) in enumerate(zip(traces, checked)):
        principle = sample_feedback_principles(constitution, 1, seed, f"{t.row.id}:accept:{r}")[0]
        for k, (candidate, problem) in enumerate(zip(candidates, problems)):
            if problem is None:
                questions.append(Question(t.row.messages, candidate, t.current, principle, (t.row.id, "accept", r, k, 0)))
                questions.append(Question(t.row.messages, t.current, candidate, principle, (t.row.id, "accept", r, k, 1)))
                keys.append((i, k))
    if not questions:
        return {}
    probabilities, _ = ask(method, questions, constitution=constitution, backend=judge, config=judging, chat=chat,
                           seed=seed)
    verdicts: dict[tuple[int, int], float | None] = {}
    for j, key in enumerate(keys):
        orders = {"ab": probabilities[2 * j], "ba": probabilities[2 * j + 1]}
        verdicts[key] = combine_orders(orders) if any(p is not None for p in orders.values()) else None
    return verdicts


def _overlap(a: str, b: str) -> float:
    """How much of ``a``'s word sequence appears, in order, in ``b`` (0-1)."""
    import difflib

    wa, wb = a.lower().split(), b.lower().split()
    if not wa:
        return 0.0
    blocks = difflib.SequenceMatcher(None, wa, wb, autojunk=False).get_matching_blocks()
    return sum(blk.size for blk in blocks) / len(wa)


def revision_problem(revision: str, *, previous: str, critique: str, constitution: Constitution) -> str | None:
    """Why a revision can't be used (the flag name), or None when it is a real revision.

    - ``empty`` / ``degenerate`` (too short, looping) / ``meta`` (talks about the response);
    - ``copied_example``: repeats a few-shot example (small models parrot the prompt);
    - ``copied_critique``: mostly the critique's words (small models paste it back);
    - ``unchanged``: nearly the previous answer's words again; ``extends_previous``: the previous
      answer with a tail appended (a caveat after a harmful answer removes nothing). A revision
      that only deletes part of the previous answer is a real revision and passes.
    """
    if not revision:
        return "empty"
    if is_degenerate(revision):
        return "degenerate"
    if is_meta_revision(revision):
        return "meta"
    if copies_an_example(revision, constitution):
        return "copied_example"
    if critique and len(revision.split()) >= 8 and _overlap(revision, critique) >= 0.6:
        return "copied_critique"
    if previous:
        kept = _overlap(previous, revision)  # share of the previous answer still there, in order
        if kept >= 0.85 and _overlap(revision, previous) >= 0.85:
            return "unchanged"
        if kept >= 0.9 and len(revision.split()) > len(previous.split()):
            return "extends_previous"
    return None


def run_critique(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``critique``: critique/revision traces (+ helpfulness answers) into ``runs/<name>/critique/``.

    Args:
        cfg: the run's `RunConfig`.
        shard: ``"i/N"`` to run only that shard's rows (joined later by ``cai merge critique``).

    Returns:
        The stage (or shard) folder.
    """
    import dataclasses
    from collections import Counter

    st = StageRun(cfg, "critique", shard)
    ccfg = cfg.critique
    constitution = load_constitution(cfg.constitution)
    if ccfg.max_examples is not None:
        constitution = dataclasses.replace(
            constitution, critique_revision_examples=constitution.critique_revision_examples[: ccfg.max_examples])
    rows = shard_rows(load_prompt_set(ccfg.prompts, "red-team prompts"), shard)
    helpful_rows = shard_rows(load_prompt_set(ccfg.helpfulness, "helpfulness prompts"), shard) if ccfg.helpfulness else []
    if st.skip():
        return st.dir
    st.start(model=cfg.model.name)
    backend = load_backend(cfg.model)
    critic = load_backend(ccfg.critic) if ccfg.critic else backend
    try:
        principle = constitution.critique_revision_principles[0]
        budget = ccfg.response.max_new_tokens + ccfg.critique_sampling.max_new_tokens + ccfg.revision_sampling.max_new_tokens
        rows = fit_prompt_set(rows, critic, budget, ccfg.prompts.too_long, "red-team prompts",
                              build=lambda chat: P.critique_chat(constitution, chat, "", principle))
        written = len(read_jsonl(st.dir / "data.jsonl", repair=True))
        st.update(prompts=len(rows), rows=written)

        def on_chunk(n: int) -> None:
            nonlocal written
            written += n
            st.update(rows=written)

        data = run_critique_revision(rows, constitution=constitution, backend=backend, critic=critic, config=ccfg,
                                     out_path=st.dir / "data.jsonl", seed=cfg.seed, show_progress=show_progress,
                                     on_chunk=on_chunk)
        helpful: list = []
        if helpful_rows:
            helpful_rows = fit_prompt_set(helpful_rows, backend, ccfg.response.max_new_tokens, ccfg.helpfulness.too_long,
                                          "helpfulness prompts")
            helpful = sample_responses(helpful_rows, backend=backend, params=ccfg.response.params(),
                                       out_path=st.dir / "helpfulness.jsonl", seed=cfg.seed, chunk_size=ccfg.chunk_size,
                                       clean=P.clean_output, show_progress=show_progress,
                                       description="helpfulness answers")
    finally:  # done with the models: the next stage's must not load beside them
        backend.close()
        if critic is not backend:
            critic.close()
    flags = Counter(flag.split(":")[-1] for row in data for flag in row["flags"])
    revised = sum(row["final_response"].strip() != row["initial_response"].strip() for row in data)
    st.done(prompts=len(rows), rows=len(data), helpfulness_rows=len(helpful), rounds=ccfg.rounds, mode=ccfg.mode,
            candidates=ccfg.candidates, flags=dict(flags),
            revisions_kept_previous=sum(r["kept_previous"] for row in data for r in row["rounds"]),
            # Rows whose final answer is a revision that passed the checks (not the initial answer kept).
            revised_rows=revised, revision_acceptance=round(revised / len(data), 4) if data else None)
    return st.dir
