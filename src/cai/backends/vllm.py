"""The vLLM backend: offline ``vllm.LLM`` on GPUs, with prefix caching and tensor parallelism.

vLLM's automatic prefix caching does what `HFBackend` does by hand (the few-shot block is
computed once and shared), across every request. Chats are rendered with the model's own chat
template (same conventions as the other backends: a final assistant message is continued), and
choice log-probabilities come from ``prompt_logprobs`` over prompt + option token ids, so they
are exact sums over the option's tokens.

Needs ``pip install 'cai[vllm]'`` and a CUDA GPU; tests carry the ``gpu`` marker.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

from cai.backends.base import Prompt, ProgressFn, count_prompt_tokens, encode_rendered, render_with_template, seeds_per_row
from cai.errors import CaiError
from cai.models import resolve_model_path
from cai.types import SamplingParams


def vllm_available() -> bool:
    """Whether the vllm package is installed (without importing it: that takes seconds)."""
    return importlib.util.find_spec("vllm") is not None


def require_vllm(switch: str | None = None) -> None:
    """Stop with one sentence where vLLM can't run: it needs the vllm package and a CUDA GPU.

    The one check for every use of vLLM (this backend, TRL's vLLM rollouts), made before any
    model loads.

    Args:
        switch: the config key that turned vLLM on (``rl.grpo.vllm.enabled``), named in the sentence
            with how to turn it off; None for the vllm backend itself.

    Raises:
        CaiError: vllm is not installed, or no CUDA GPU is visible.
    """
    what, instead = ((switch, f"set {switch}=false to generate with transformers") if switch
                     else ("the vllm backend", "use backend: hf on this machine"))
    if not vllm_available():
        raise CaiError(f"{what} needs the vllm package; install it with: pip install 'cai[vllm]' (CUDA GPUs only), "
                       f"or {instead}")
    import torch  # lazy: torch takes seconds to import and this module is read by the pipeline's checks

    if not torch.cuda.is_available():
        raise CaiError(f"{what} needs a CUDA GPU and none is visible; {instead}")


class VLLMBackend:
    """`Backend` over an offline ``vllm.LLM``."""

    def __init__(self, llm: Any) -> None:
        self.llm = llm
        self.tokenizer = llm.get_tokenizer()
        config = llm.llm_engine.model_config
        self.context_length = int(getattr(config, "max_model_len", 0) or 0) or None
        self.has_chat_template = getattr(self.tokenizer, "chat_template", None) is not None

    @classmethod
    def from_spec(cls, spec: str, *, dtype: str = "auto", tensor_parallel: int = 1, trust_remote_code: bool = False,
                  gpu_memory_utilization: float = 0.85, **kwargs: Any) -> VLLMBackend:
        """Load a model spec (resolved like every backend: bundled, .gguf, folder or hub id)."""
        require_vllm()
        from vllm import LLM  # lazy: an optional dependency

        path, _ = resolve_model_path(spec)
        llm = LLM(model=path, dtype=dtype, tensor_parallel_size=tensor_parallel, enable_prefix_caching=True,
                  trust_remote_code=trust_remote_code, gpu_memory_utilization=gpu_memory_utilization, **kwargs)
        return cls(llm)

    def close(self) -> None:
        """Shut the engine down and give its GPU memory back (vLLM holds it until told)."""
        import gc

        import torch

        llm, self.llm = self.llm, None
        if llm is not None:
            engine = getattr(llm, "llm_engine", None)
            shutdown = getattr(engine, "shutdown", None) or getattr(getattr(engine, "engine_core", None), "shutdown", None)
            if callable(shutdown):
                shutdown()
            del llm
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def render(self, prompt: Prompt) -> str:
        return render_with_template(self.tokenizer, prompt,
                                    "this model's tokenizer has no chat template; pass plain-text prompts")

    def count_tokens(self, prompt: Prompt) -> int:
        return count_prompt_tokens(self.tokenizer, prompt)

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams, *, seeds: Sequence[int] | None = None,
                 progress: ProgressFn | None = None) -> list[str]:
        row_seeds = seeds_per_row(seeds, params.seed, len(prompts))
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        rows = [TokensPrompt(prompt_token_ids=ids) for ids in encode_rendered(self.tokenizer, [self.render(p) for p in prompts])]
        sampling = [VSamplingParams(max_tokens=params.max_new_tokens, temperature=params.temperature,
                                    top_p=params.top_p, top_k=params.top_k or -1, stop=list(params.stop) or None,
                                    seed=None if params.greedy else s % (2**31)) for s in row_seeds]
        outputs = self.llm.generate(rows, sampling, use_tqdm=False)
        texts = [o.outputs[0].text for o in outputs]
        if progress is not None:
            progress(len(texts), sum(len(o.outputs[0].token_ids) for o in outputs))
        return texts

    def choice_logprobs(self, prompts: Sequence[str], options: Sequence[str]) -> list[list[float]]:
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        if not options:
            raise CaiError("choice_logprobs needs at least one option")
        prompt_ids = encode_rendered(self.tokenizer, list(prompts))
        option_ids = [self.tokenizer(o, add_special_tokens=False)["input_ids"] for o in options]
        rows = [TokensPrompt(prompt_token_ids=p + o) for p in prompt_ids for o in option_ids]
        outputs = self.llm.generate(rows, VSamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        result: list[list[float]] = []
        for i, p in enumerate(prompt_ids):
            row = []
            for j, o in enumerate(option_ids):
                scored = outputs[i * len(option_ids) + j].prompt_logprobs
                total = 0.0
                for k, token in enumerate(o):
                    total += scored[len(p) + k][token].logprob
                row.append(total)
            result.append(row)
        return result
