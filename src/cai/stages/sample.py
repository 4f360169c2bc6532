"""Sampling stage: K responses per prompt from a policy, resumable.

Used for the helpfulness answers mixed into SL-CAI training (K=1) and for the response pairs
that AI feedback labels (K>=2). Each sample has its own seed derived from (seed, row id, k), so
a rerun after a crash draws the same samples for the rows it redoes.

With ``sample.rlcd`` (RLCD, Yang et al. 2023) each red-team prompt gets a contrast pair instead:
one answer under a system turn asking the model to follow a feedback principle, one under a
system turn asking it to violate it (the principle's `cai.constitution.RlcdStatements`). The row
records which answer followed (``rlcd.preferred``), so the label stage prefers it by construction
and asks no judge. The principle is drawn per prompt as a label's would be, and which position
holds the follow answer is decided by a hash of the prompt id, so that a preference model cannot
learn a position. The recorded ``prompt`` is the user's conversation alone, without the statement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, NamedTuple

from cai import prompts as P
from cai.backends import load_backend
from cai.backends.base import Backend, stable_seed
from cai.config import RunConfig
from cai.constitution import Constitution, FeedbackPrinciple, sample_feedback_principles
from cai.constitution_yaml import load_constitution
from cai.data import PromptRow
from cai.data.prompt_sets import fit_prompt_set, load_prompt_set
from cai.errors import CaiError
from cai.io import JsonlWriter, iter_batches, read_jsonl
from cai.progress import progress_bar
from cai.runs import StageRun, policy_spec
from cai.sharding import shard_rows
from cai.types import Chat, SamplingParams


class ContrastDraw(NamedTuple):
    """One prompt's RLCD draw: the feedback principle, and the position (0 or 1) of its follow answer."""

    principle: FeedbackPrinciple
    preferred: int

    def statements(self) -> tuple[str, str]:
        """The system statements of answers 0 and 1: ``follow`` at ``preferred``, ``violate`` at the other."""
        rlcd = self.principle.rlcd
        if rlcd is None:
            raise CaiError(f"feedback principle '{self.principle.id}' has no RLCD statements")
        return (rlcd.follow, rlcd.violate) if self.preferred == 0 else (rlcd.violate, rlcd.follow)


def draw_contrast(constitution: Constitution, seed: int, prompt_id: str) -> ContrastDraw:
    """The RLCD draw of one prompt, a function of (seed, prompt id) alone, so a resumed or sharded run
    draws what an uninterrupted one would.

    The principle is drawn by `sample_feedback_principles` keyed by the prompt id; the follow answer's
    position is one bit of a hash of the same, so over many prompts each position holds it about half
    the time.
    """
    principle = sample_feedback_principles(constitution, 1, seed, prompt_id)[0]
    return ContrastDraw(principle, stable_seed(seed, prompt_id, "rlcd-position") % 2)


def missing_rlcd_statements(constitution: Constitution, name: str) -> str | None:
    """The sentence that stops an RLCD run whose constitution lacks statements, or None when every
    feedback principle has them."""
    missing = next((p for p in constitution.feedback_principles if p.rlcd is None), None)
    if missing is None:
        return None
    return (f"sample.rlcd needs RLCD statements for every feedback principle, but constitution '{name}' has none "
            f"for '{missing.id}'; give it rlcd: {{follow: ..., violate: ...}} or set sample.rlcd=false")


def sample_responses(
    rows: list[PromptRow],
    *,
    backend: Backend,
    params: SamplingParams,
    out_path: str | Path,
    k: int = 1,
    seed: int = 0,
    chunk_size: int = 16,
    clean: Callable[[str], str] = str.strip,
    show_progress: bool = True,
    description: str = "sampling",
    set_name: str = "",
    contrast: Constitution | None = None,
    system: str | None = None,
) -> list[dict[str, Any]]:
    """Write ``{"id", "set", "category", "split", "prompt", "responses": [k texts], "messages"}`` rows.

    ``messages`` is the prompt plus the first response (the preferred one with ``contrast``), in
    TRL's conversational SFT format.

    Args:
        contrast: sample RLCD pairs under this constitution's statements (`draw_contrast`): ``k``
            must be 2, and each row also records ``"rlcd": {"principle_id", "preferred"}``, where
            ``responses[preferred]`` is the answer written under the ``follow`` statement.
        system: a system turn every answer is written under (`P.with_system_turn`). Like a contrast
            statement it stays out of the row: ``prompt`` and ``messages`` hold the user's conversation.

    Raises:
        ValueError: ``contrast`` with ``k`` other than 2.
    """
    if contrast is not None and k != 2:
        raise ValueError(f"an RLCD contrast pair is two answers, so k must be 2, not {k}")
    done = {r["id"] for r in read_jsonl(out_path, repair=True)}
    todo = [r for r in rows if r.id not in done]
    with JsonlWriter(out_path) as writer, progress_bar(description, len(todo), enabled=show_progress) as advance:
        for chunk in iter_batches(todo, chunk_size):
            draws = [draw_contrast(contrast, seed, row.id) if contrast else None for row in chunk]
            prompts = [_prompt(P.with_system_turn(row.messages, system) if system else row.messages, draw, j)
                       for row, draw in zip(chunk, draws) for j in range(k)]
            seeds = [stable_seed(seed, row.id, "sample", j) for row in chunk for j in range(k)]
            texts = backend.generate(prompts, params, seeds=seeds, progress=lambda _r, n: advance(0, n))
            for i, (row, draw) in enumerate(zip(chunk, draws)):
                responses = [clean(t) for t in texts[i * k:(i + 1) * k]]
                first = responses[draw.preferred if draw else 0]
                out = {
                    "id": row.id, "set": set_name, "category": row.category, "split": row.split, "prompt": row.messages,
                    "responses": responses,
                    "messages": [*row.messages, {"role": "assistant", "content": first}],
                }
                if draw is not None:
                    out["rlcd"] = {"principle_id": draw.principle.id, "preferred": draw.preferred}
                writer.write(out)
            advance(len(chunk), 0)
    return read_jsonl(out_path)


def _prompt(conversation: Chat, draw: ContrastDraw | None, j: int) -> Chat:
    """What answer ``j`` to ``conversation`` is sampled from: the conversation, under the draw's statement."""
    return conversation if draw is None else P.contrast_chat(conversation, draw.statements()[j])


def run_sample(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``sample``: K answers per red-team (and helpfulness) prompt from the policy, into ``sample/``."""
    st = StageRun(cfg, "sample", shard)
    scfg = cfg.sample
    contrast = load_constitution(cfg.constitution) if scfg.rlcd else None
    if contrast is not None and (problem := missing_rlcd_statements(contrast, cfg.constitution)):
        raise CaiError(problem)
    sets = [("red-team", scfg.prompts, load_prompt_set(scfg.prompts, "red-team prompts"))]
    if scfg.helpfulness:
        sets.append(("helpfulness", scfg.helpfulness, load_prompt_set(scfg.helpfulness, "helpfulness prompts")))
    if st.skip():
        return st.dir
    spec = policy_spec(cfg)
    st.start(model=spec)
    backend = load_backend(cfg.model.model_copy(update={"name": spec}))
    counts = {}
    try:
        for name, prompt_cfg, rows in sets:
            # Only red-team prompts get contrast pairs: helpfulness has no principle to follow or violate.
            set_contrast = contrast if name == "red-team" else None
            # Each set keeps its own too-long policy: the red-team one must not decide for helpfulness.
            rows = fit_prompt_set(shard_rows(rows, shard), backend, scfg.sampling.max_new_tokens, prompt_cfg.too_long,
                                  name, build=_longest_contrast(set_contrast))
            data = sample_responses(rows, backend=backend, params=scfg.sampling.params(),
                                    out_path=st.dir / f"{name}.jsonl", k=scfg.k, seed=cfg.seed,
                                    chunk_size=scfg.chunk_size, clean=P.clean_output, show_progress=show_progress,
                                    description=f"sampling {name}", set_name=name, contrast=set_contrast)
            counts[f"{name}_prompts"] = len(data)
            st.update(**counts)
    finally:
        backend.close()
    st.done(k=scfg.k, rlcd=scfg.rlcd, **counts)
    return st.dir


def _longest_contrast(contrast: Constitution | None) -> Callable[[Chat], Chat] | None:
    """For fitting prompts to the context: a chat under the longest RLCD statement (None: no statement)."""
    if contrast is None:
        return None
    longest = max((s for p in contrast.feedback_principles if p.rlcd for s in (p.rlcd.follow, p.rlcd.violate)),
                  key=len)
    return lambda chat: P.contrast_chat(chat, longest)
