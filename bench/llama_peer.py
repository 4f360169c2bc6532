"""llama.cpp as the benches' optional peer, through llama-cpp-python (not a cai dependency).

`missing` says in one sentence why its rows can't run; `f32_gguf` writes the model with cai's own
exporter; `open_llama` opens it the way every bench compares it; `one_at_a_time` and `batched` are
the two ways `generation.py` runs it. Token ids in and out: the caller decodes with cai's tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

LLAMA_CPP_INSTALL = "pip install llama-cpp-python==0.3.36"


def missing() -> str | None:
    """Why the llama.cpp rows can't run here, as one sentence; None when they can.

    ``CAI_BENCH_NO_LLAMA=1`` skips them on purpose (to check the skipped path, or to save time).
    """
    if os.environ.get("CAI_BENCH_NO_LLAMA"):
        return "skipped: CAI_BENCH_NO_LLAMA is set"
    try:
        importlib.import_module("llama_cpp")
    except (ImportError, OSError) as e:  # OSError: the package is there but its shared library won't load
        return f"skipped: import llama_cpp failed ({type(e).__name__}: {e}); {LLAMA_CPP_INSTALL} runs them"
    return None


def f32_gguf(spec: str) -> Path:
    """An f32 GGUF of the model ``spec`` names, written by cai's own exporter once and cached.

    The file lives under ``$CAI_HOME/bench/``, named after the model folder, its files' times and
    cai's version, so a changed model or exporter writes a new one.
    """
    from cai import __version__
    from cai.export import export_gguf, resolve_export_source
    from cai.models import cai_home

    folder = resolve_export_source(spec)
    stamp = max(f.stat().st_mtime_ns for f in folder.iterdir())
    key = hashlib.sha1(f"{folder.resolve()}:{stamp}:{__version__}".encode()).hexdigest()[:10]
    path = cai_home() / "bench" / f"{folder.name}-{key}-f32.gguf"
    if not path.is_file():
        export_gguf(spec, path, "f32", show_progress=False)
    return path


def open_llama(gguf: Path, n_ctx: int, n_batch: int = 512) -> Any:
    """A ``llama_cpp.Llama`` on ``gguf`` as the benches run it: torch's thread count, f32 KV cache
    (cai's cache is f32 too; llama.cpp's default f16 cache alone moves logits by ~1e-3), prefill in
    batches of ``n_batch`` tokens, no logging."""
    from llama_cpp import Llama

    threads = torch.get_num_threads()
    return Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch, n_threads=threads,
                 n_threads_batch=threads, type_k=0, type_v=0, verbose=False)  # 0 = GGML_TYPE_F32


def one_at_a_time(llm: Any, ids: list[list[int]], new_tokens: int, eos: set[int]) -> tuple[list[list[int]], int]:
    """llama.cpp one prompt at a time: ``Llama.generate`` on cai's token ids, greedy, from an empty cache.

    ``generate`` keeps the previous prompt's KV cache and evaluates only what follows the longest
    prefix the new prompt shares with it, so a shared few-shot prefix is prefilled once.

    Returns:
        The generated ids per prompt, and how many prompt tokens llama.cpp says it evaluated: about the prefix once plus each prompt's own suffix when the reuse works.
    """
    import llama_cpp

    llm.reset()
    llama_cpp.llama_perf_context_reset(llm.ctx)
    out = []
    for row in ids:
        tokens: list[int] = []
        for token in llm.generate(row, temp=0.0, top_k=1):
            if token in eos or len(tokens) == new_tokens:
                break
            tokens.append(token)
        out.append(tokens)
    evaluated = llama_cpp.llama_perf_context(llm.ctx).n_p_eval
    return out, evaluated


@dataclass
class Steps:
    """The decode steps of a batched run alone: tokens fed through them and their seconds."""

    tokens: int = 0
    seconds: float = 0.0


def batched(llm: Any, ids: list[list[int]], new_tokens: int, eos: set[int],
            slots: int) -> tuple[list[list[int]], float, Steps]:
    """llama.cpp's batched decode through its C API, as ``llama-batched-bench`` runs a shared prompt.

    One context with ``slots`` sequences and a unified KV cache (the prefix's cells are shared by
    every sequence, not copied). The prompts' shared prefix is decoded once into sequence 0; for
    each group of ``slots`` prompts it is copied to sequences 1.. (``llama_memory_seq_cp``: cells
    tagged, no data moved), each row's own suffix is decoded in one batch, and then each step
    decodes one batch holding the last token of every live row; the next token is the argmax of
    that row's logits, and a row leaves at an EOS id or ``new_tokens``.

    Returns:
        The generated ids per prompt, the seconds from the prefix's decode to the last step (the
        context's set-up excluded), and the decode steps alone.
    """
    import llama_cpp
    import numpy as np

    from cai.backends.kv_cache import common_prefix_length

    prefix = min(common_prefix_length(ids), min(map(len, ids)) - 1)
    params = llama_cpp.llama_context_default_params()
    needed = prefix + slots * (max(map(len, ids)) - prefix + new_tokens) + 1
    params.n_ctx = -(-needed // 256) * 256
    params.n_batch = params.n_ubatch = 512
    params.n_seq_max, params.kv_unified = slots, True
    # Flash attention off, as llama-cpp-python's Llama defaults to: on this CPU with an f32 cache it
    # made the decode steps 3.5x slower (22 vs 77 tokens/s, 16 rows, 1 thread); a split (not
    # unified) cache, which copies the prefix into each sequence, was 1.6x slower.
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    params.n_threads = params.n_threads_batch = torch.get_num_threads()
    params.type_k = params.type_v = 0  # f32, as `open_llama`
    ctx = llama_cpp.llama_init_from_model(llm.model, params)
    batch = llama_cpp.llama_batch_init(params.n_batch, 0, 1)
    vocab = llm.n_vocab()

    def decode(entries: list[tuple[int, int, int, bool]]) -> list[int]:
        """Decode (token, position, sequence, wants logits) entries; the argmax after each that wants them."""
        picked = []
        for start in range(0, len(entries), params.n_batch):
            chunk = entries[start:start + params.n_batch]
            for k, (token, pos, seq, wants) in enumerate(chunk):
                batch.token[k], batch.pos[k], batch.n_seq_id[k], batch.logits[k] = token, pos, 1, wants
                batch.seq_id[k][0] = seq
            batch.n_tokens = len(chunk)
            if llama_cpp.llama_decode(ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed on {len(chunk)} tokens (n_ctx {params.n_ctx})")
            picked += [int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, k), shape=(vocab,)).argmax())
                       for k, entry in enumerate(chunk) if entry[3]]
        return picked

    out: list[list[int]] = [[] for _ in ids]
    steps = Steps()
    try:
        memory = llama_cpp.llama_get_memory(ctx)
        started = time.perf_counter()
        decode([(t, pos, 0, False) for pos, t in enumerate(ids[0][:prefix])])
        for start in range(0, len(ids), slots):
            group = list(range(start, min(start + slots, len(ids))))
            llama_cpp.llama_memory_seq_rm(memory, -1, prefix, -1)  # the last group's rows; the prefix stays
            for seq in range(1, len(group)):
                llama_cpp.llama_memory_seq_cp(memory, 0, seq, -1, -1)
            suffixes = [(t, pos, seq, pos == len(ids[i]) - 1) for seq, i in enumerate(group)
                        for pos, t in enumerate(ids[i][prefix:], prefix)]
            live = dict(zip(range(len(group)), group))  # sequence -> row
            picked = decode(suffixes)
            while True:
                for (seq, i), token in zip(list(live.items()), picked):
                    if token in eos:
                        del live[seq]
                    else:
                        out[i].append(token)
                        if len(out[i]) == new_tokens:
                            del live[seq]
                if not live:
                    break
                step = time.perf_counter()
                picked = decode([(out[i][-1], len(ids[i]) + len(out[i]) - 1, seq, True) for seq, i in live.items()])
                steps.seconds += time.perf_counter() - step
                steps.tokens += len(live)
        seconds = time.perf_counter() - started
    finally:
        llama_cpp.llama_batch_free(batch)
        llama_cpp.llama_free(ctx)
    return out, seconds, steps
