"""Model backends behind one small protocol (see `cai.backends.base`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cai.backends.base import Backend, Prompt, SamplingParams

if TYPE_CHECKING:
    from cai.config import ModelConfig

__all__ = ["Backend", "Prompt", "SamplingParams", "load_backend"]


def load_backend(config: ModelConfig) -> Backend:
    """The backend a model config asks for, with its model loaded."""
    if config.backend == "fake":
        from cai.backends.fake import FakeBackend

        return FakeBackend()
    from cai.backends.hf import HFBackend

    return HFBackend.from_spec(
        config.name, dtype=config.dtype, device=config.device, trust_remote_code=config.trust_remote_code,
        allow_pickle=config.allow_pickle, batch_size=config.batch_size, reuse_prefix=config.reuse_prefix,
    )
