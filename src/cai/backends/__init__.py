"""Model backends behind one small protocol (see `cai.backends.base`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai.backends.base import Backend, Prompt

if TYPE_CHECKING:
    from cai.config import ModelConfig

__all__ = ["Backend", "Prompt", "load_backend"]


def load_backend(config: ModelConfig) -> Backend:
    """The backend a model config asks for, with its model loaded."""
    if config.backend == "fake":
        from cai.backends.fake import FakeBackend

        return FakeBackend()
    if config.backend == "http":
        from cai.backends.openai_http import from_config

        return from_config(config.base_urls, config.name, api_key_env=config.api_key_env, mode=config.http_mode,
                           concurrency=config.concurrency, timeout_s=config.timeout_s,
                           max_retries=config.max_retries, tokenizer=config.tokenizer)
    if config.backend == "vllm":
        from cai.backends.vllm import VLLMBackend

        return VLLMBackend.from_spec(config.name, dtype=config.dtype, tensor_parallel=config.tensor_parallel,
                                     trust_remote_code=config.trust_remote_code)
    from cai.backends.hf import HFBackend

    return HFBackend.from_spec(
        config.name, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code,
        allow_pickle=config.allow_pickle, batch_size=config.batch_size, reuse_prefix=config.reuse_prefix,
    )
