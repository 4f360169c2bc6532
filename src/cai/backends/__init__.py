"""Model backends behind one small protocol (see `cai.backends.base`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cai.backends.base import Backend, Prompt
from cai.backends.fake import FakeBackend
from cai.backends.openai_http import from_config
from cai.backends.vllm import VLLMBackend

if TYPE_CHECKING:
    from cai.config import ModelConfig

__all__ = ["Backend", "Prompt", "load_backend"]


def load_backend(config: ModelConfig, *, cache_dir: str | Path | None = None) -> Backend:
    """The backend a model config asks for, with its model loaded.

    Args:
        cache_dir: http backend: where server answers are kept (a stage passes its own folder);
            it wins over ``config.cache_dir``, so the config (and its hash) need not change.
    """
    if config.backend == "fake":
        return FakeBackend()
    if config.backend == "http":
        return from_config(config.base_urls, config.name, api_key_env=config.api_key_env, mode=config.http_mode,
                           concurrency=config.concurrency, timeout_s=config.timeout_s,
                           max_retries=config.max_retries, tokenizer=config.tokenizer,
                           cache_dir=cache_dir if cache_dir is not None else config.cache_dir)
    if config.backend == "vllm":
        return VLLMBackend.from_spec(config.name, dtype=config.dtype, tensor_parallel=config.tensor_parallel,
                                     trust_remote_code=config.trust_remote_code)
    from cai.backends.hf import HFBackend  # lazy: imports torch (seconds), which the http and fake backends never need

    return HFBackend.from_spec(
        config.name, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code,
        allow_pickle=config.allow_pickle, batch_size=config.batch_size, reuse_prefix=config.reuse_prefix,
        cascade=config.cascade, compile_decode=config.compile_decode,
    )
