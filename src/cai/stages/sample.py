"""Sampling stage: K responses per prompt from a policy, resumable.

Used for the helpfulness answers mixed into SL-CAI training (K=1) and for the response pairs
that AI feedback labels (K>=2). Each sample has its own seed derived from (seed, row id, k), so
a rerun after a crash draws the same samples for the rows it redoes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from cai import prompts as P
from cai.backends import load_backend
from cai.backends.base import Backend, stable_seed
from cai.config import RunConfig
from cai.data import PromptRow
from cai.data.prompt_sets import fit_prompt_set, load_prompt_set
from cai.io import JsonlWriter, iter_batches, read_jsonl
from cai.progress import progress_bar
from cai.runs import StageRun, policy_spec
from cai.sharding import shard_rows
from cai.types import SamplingParams


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
) -> list[dict[str, Any]]:
    """Write ``{"id", "set", "category", "split", "prompt", "responses": [k texts], "messages"}`` rows.

    ``messages`` is the prompt plus the first response, in TRL's conversational SFT format.
    """
    done = {r["id"] for r in read_jsonl(out_path, repair=True)}
    todo = [r for r in rows if r.id not in done]
    with JsonlWriter(out_path) as writer, progress_bar(description, len(todo), enabled=show_progress) as advance:
        for chunk in iter_batches(todo, chunk_size):
            prompts = [row.messages for row in chunk for _ in range(k)]
            seeds = [stable_seed(seed, row.id, "sample", j) for row in chunk for j in range(k)]
            texts = backend.generate(prompts, params, seeds=seeds, progress=lambda _r, n: advance(0, n))
            for i, row in enumerate(chunk):
                responses = [clean(t) for t in texts[i * k:(i + 1) * k]]
                writer.write({
                    "id": row.id, "set": set_name, "category": row.category, "split": row.split, "prompt": row.messages,
                    "responses": responses,
                    "messages": [*row.messages, {"role": "assistant", "content": responses[0]}],
                })
            advance(len(chunk), 0)
    return read_jsonl(out_path)


def run_sample(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``sample``: K answers per red-team (and helpfulness) prompt from the policy, into ``sample/``."""
    st = StageRun(cfg, "sample", shard)
    scfg = cfg.sample
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
            # Each set keeps its own too-long policy: the red-team one must not decide for helpfulness.
            rows = fit_prompt_set(shard_rows(rows, shard), backend, scfg.sampling.max_new_tokens, prompt_cfg.too_long,
                                  name)
            data = sample_responses(rows, backend=backend, params=scfg.sampling.params(),
                                    out_path=st.dir / f"{name}.jsonl", k=scfg.k, seed=cfg.seed,
                                    chunk_size=scfg.chunk_size, clean=P.clean_output, show_progress=show_progress,
                                    description=f"sampling {name}", set_name=name)
            counts[f"{name}_prompts"] = len(data)
            st.update(**counts)
    finally:
        backend.close()
    st.done(k=scfg.k, **counts)
    return st.dir
