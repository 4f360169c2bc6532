"""Typed configs: YAML files plus ``key=value`` overrides, checked before any model loads.

Every config class forbids unknown keys, so a typo (``temprature: 0.7``) fails at once with a
sentence that names the key and the keys that are allowed there. Overrides use dotted keys and
YAML values: ``sampling.temperature=0.7``, ``model.name=path/to/model``, ``sampling.stop=["\\n\\n"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt

from cai.config_loader import (  # noqa: F401  (re-exported: the public config API lives here)
    apply_overrides,
    config_hash,
    config_to_yaml,
    load_config,
    read_yaml,
)


class Strict(BaseModel):
    """Base for every config: unknown keys and wrong types are errors.

    Integer fields are `StrictInt`: pydantic would otherwise read YAML's `true` as 1.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Strict):
    """Which model answers, and how it runs."""

    name: str = Field("bundled", description="'bundled', a model folder, a .gguf file, or a hub id (org/name).")
    backend: Literal["hf", "http", "vllm", "fake"] = Field(
        "hf", description="Engine: 'hf' (transformers), 'http' (OpenAI-compatible servers), 'vllm' (offline, GPU), 'fake' (tests)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="'auto' = float32 on CPU (bf16 is very slow there), bf16 on CUDA."
    )
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'.")
    batch_size: StrictInt = Field(16, ge=1, description="Rows per forward pass.")
    reuse_prefix: bool = Field(True, description="Compute a shared prompt prefix's KV cache once and reuse it.")
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model. Off unless you trust it.")
    allow_pickle: bool = Field(False, description="Accept pickle (.bin) weights, which can run code when loaded.")
    base_urls: list[str] = Field(default_factory=list, description="http backend: server URLs (round-robin), e.g. http://gpu1:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="http backend: environment variable holding the API key (never the key itself).")
    http_mode: Literal["chat", "completion"] = Field("chat", description="http backend: which endpoint generation uses.")
    tokenizer: str | None = Field(None, description="http backend: local tokenizer (model spec) to render chats for scoring.")
    concurrency: StrictInt = Field(8, ge=1, description="http backend: requests in flight.")
    timeout_s: float = Field(60.0, gt=0, description="http backend: seconds per request.")
    max_retries: StrictInt = Field(5, ge=0, description="http backend: retries on 429/5xx/connection errors.")
    tensor_parallel: StrictInt = Field(1, ge=1, description="vllm backend: GPUs per model.")


class SamplingConfig(Strict):
    """How continuations are sampled (see `cai.backends.base.SamplingParams`)."""

    max_new_tokens: StrictInt = Field(128, ge=1)
    temperature: float = Field(0.0, ge=0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: StrictInt = Field(0, ge=0)
    seed: StrictInt = 0
    stop: list[str] = Field(default_factory=list, description="Strings that end an output (cut before them).")

    def params(self):
        from cai.backends.base import SamplingParams

        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop=tuple(self.stop),
        )


class GenerateConfig(Strict):
    """``cai generate``: answer a list of prompts with one model."""

    model: ModelConfig = Field(default_factory=ModelConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)


class PromptSetConfig(Strict):
    """Where a stage's prompts come from."""

    source: str = Field("red-team", description="Built-in set (red-team, helpfulness), a file, a dataset folder or hf:NAME.")
    split: str | None = Field("train", description="Keep rows of this split only (null: all rows).")
    limit: StrictInt | None = Field(None, ge=1, description="Use at most this many prompts.")
    too_long: Literal["truncate_left", "drop"] = Field(
        "truncate_left", description="Prompts that don't fit the context: drop their oldest turns, or drop them."
    )


def _sampling(**kw: Any) -> Any:
    return Field(default_factory=lambda: SamplingConfig(**kw))


class CritiqueConfig(Strict):
    """``cai critique``: the helpful model answers red-team prompts, then critiques and revises."""

    prompts: PromptSetConfig = Field(default_factory=PromptSetConfig)
    helpfulness: PromptSetConfig | None = Field(
        default_factory=lambda: PromptSetConfig(source="helpfulness", limit=64),
        description="Prompts the model simply answers, to mix into SL-CAI training; null to skip.",
    )
    rounds: StrictInt = Field(4, ge=1, description="Critique/revision rounds per prompt (the paper used 4).")
    max_examples: StrictInt | None = Field(
        None, ge=0, description="Use only the first N few-shot examples of the constitution (shorter prompts, faster)."
    )
    critique: bool = Field(True, description="false = revise directly without a critique (the paper's ablation).")
    prompt_format: Literal["auto", "chat", "text"] = Field(
        "auto", description="'chat' uses the model's chat template, 'text' a plain transcript; 'auto' picks chat when there is a template."
    )
    critic: ModelConfig | None = Field(None, description="Model that critiques and revises; null = the same model.")
    response: SamplingConfig = _sampling(max_new_tokens=128, temperature=0.7, top_p=0.9)
    critique_sampling: SamplingConfig = _sampling(max_new_tokens=96, temperature=0.7, top_p=0.9)
    revision_sampling: SamplingConfig = _sampling(max_new_tokens=128, temperature=0.7, top_p=0.9)
    chunk_size: StrictInt = Field(16, ge=1, description="Rows generated together and then written; a crash loses at most one chunk.")


class LoraConfig(Strict):
    """Low-rank adapters (peft) instead of full fine-tuning.

    The saved model always has the adapter merged in (every backend loads it as is); the adapter
    alone is kept in the stage folder's ``adapter/``.
    """

    enabled: bool = False
    r: StrictInt = Field(16, ge=1)
    alpha: StrictInt = Field(32, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | str = Field("all-linear", description="Module names, or 'all-linear'.")


class SFTConfig(Strict):
    """``cai sft``: supervised fine-tuning on the revisions (SL-CAI)."""

    revisions: Literal["final", "all"] = Field(
        "final", description="Train on the final revision only, or on every round's revision (as the paper did)."
    )
    helpfulness_ratio: float = Field(
        0.25, ge=0, lt=1, description="Share of helpfulness rows in the training mix (capped by what exists)."
    )
    extra_data: str | None = Field(None, description="A user's own SFT data (chat 'messages' rows) to mix in as helpfulness data.")
    epochs: StrictInt = Field(1, ge=1)
    max_steps: StrictInt | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: StrictInt = Field(4, ge=1)
    gradient_accumulation: StrictInt = Field(1, ge=1)
    learning_rate: float = Field(2e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_length: StrictInt = Field(512, ge=16, description="Tokens per example; longer ones are cut from the left of the prompt.")
    max_grad_norm: float = Field(1.0, gt=0)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    save_every: StrictInt = Field(50, ge=1, description="Optimizer steps between resumable checkpoints.")
    activation_checkpointing: bool = Field(False, description="Trade compute for memory; only when memory asks for it.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class SampleConfig(Strict):
    """``cai sample``: K responses per prompt from the policy, to be labelled by AI feedback."""

    policy: str | None = Field(None, description="Model to sample from; null = this run's SL-CAI model (sl_cai/).")
    prompts: PromptSetConfig = Field(default_factory=lambda: PromptSetConfig(limit=256))
    helpfulness: PromptSetConfig | None = Field(
        default_factory=lambda: PromptSetConfig(source="helpfulness", limit=64),
        description="Helpfulness prompts whose pairs are labelled under the helpfulness question; null to skip.",
    )
    k: StrictInt = Field(2, ge=2, description="Responses per prompt.")
    sampling: SamplingConfig = _sampling(max_new_tokens=128, temperature=1.0, top_p=0.95)
    chunk_size: StrictInt = Field(16, ge=1)


class LabelConfig(Strict):
    """``cai label``: soft AI preference labels from multiple-choice log-probabilities."""

    feedback_model: ModelConfig | None = Field(None, description="Feedback model; null = the run's starting model.")
    pairing: Literal["consecutive", "all"] = Field("consecutive", description="Which response pairs to label per prompt.")
    principles_per_label: StrictInt = Field(1, ge=1, description="Ensemble size: principles drawn and averaged per pair.")
    swap: bool = Field(True, description="Ask in both orders (A,B) and (B,A) and average, cancelling position bias.")
    cot: bool = Field(False, description="Chain of thought: reason first, then read the answer's probabilities.")
    clamp: tuple[float, float] = Field((0.4, 0.6), description="CoT probabilities are clamped to this band.")
    hard: bool = Field(False, description="Round labels to 0/1.")
    cot_sampling: SamplingConfig = _sampling(max_new_tokens=96, temperature=0.0)
    prompt_format: Literal["auto", "chat", "text"] = "auto"
    helpfulness_question: str = Field(
        "Which response is more helpful: more accurate, relevant, clear and useful to the human?",
        description="Question for pairs from helpfulness prompts.",
    )
    chunk_size: StrictInt = Field(16, ge=1)


class PMConfig(Strict):
    """``cai pm``: a scalar-head preference model trained on the soft AI labels."""

    base: str | None = Field(None, description="Model the PM starts from; null = the run's starting model.")
    helpfulness_ratio: float = Field(0.25, ge=0, lt=1, description="Share of helpfulness comparisons in the mix.")
    human_data: str | None = Field(None, description="hh-rlhf style chosen/rejected comparisons to use for helpfulness.")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="Share of prompts held out for accuracy and calibration.")
    epochs: StrictInt = Field(2, ge=1)
    batch_size: StrictInt = Field(8, ge=1)
    learning_rate: float = Field(3e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    max_length: StrictInt = Field(512, ge=16)
    max_grad_norm: float = Field(1.0, gt=0)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class RLConfig(Strict):
    """``cai rl``: PPO of the SL-CAI policy against the PM (KL to SL-CAI), or DPO on the labels."""

    algo: Literal["ppo", "dpo", "both"] = Field("ppo", description="'both' trains PPO and DPO models side by side.")
    prompts: PromptSetConfig = Field(default_factory=lambda: PromptSetConfig(limit=None))
    helpfulness: PromptSetConfig | None = Field(default_factory=lambda: PromptSetConfig(source="helpfulness", limit=None))
    helpfulness_ratio: float = Field(0.25, ge=0, lt=1, description="Share of helpfulness prompts in each rollout batch.")
    eval_prompts: PromptSetConfig = Field(
        default_factory=lambda: PromptSetConfig(split="test", limit=16),
        description="Held-out prompts whose mean PM reward is measured before, during and after PPO.",
    )
    steps: StrictInt = Field(20, ge=1, description="PPO iterations (rollout batch + optimisation).")
    rollout_batch: StrictInt = Field(8, ge=1, description="Prompts per PPO iteration.")
    ppo_epochs: StrictInt = Field(2, ge=1, description="Passes over each rollout batch.")
    minibatch: StrictInt = Field(4, ge=1)
    learning_rate: float = Field(1e-5, gt=0)
    sampling: SamplingConfig = _sampling(max_new_tokens=64, temperature=1.0, top_p=1.0)
    kl_coef: float = Field(0.05, ge=0, description="beta: per-token KL penalty to the SL-CAI policy.")
    adaptive_kl: bool = Field(False, description="Adapt beta toward kl_target (Ziegler et al. 2019).")
    kl_target: float = Field(6.0, gt=0)
    kl_horizon: StrictInt = Field(10000, ge=1)
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_range: float = Field(0.2, gt=0)
    clip_range_value: float = Field(0.2, gt=0)
    value_coef: float = Field(0.1, ge=0)
    entropy_coef: float = Field(0.0, ge=0)
    reward_clip: float | None = Field(5.0, gt=0, description="Clip normalised PM rewards to +-this; null = no clip.")
    normalize_reward: bool = Field(True, description="Normalise PM scores with running mean/std.")
    max_grad_norm: float = Field(1.0, gt=0)
    eval_every: StrictInt = Field(10, ge=1)
    save_every: StrictInt = Field(10, ge=1)
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Also log to these trackers (through accelerate)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig)
    # DPO
    dpo_beta: float = Field(0.1, gt=0)
    dpo_min_confidence: float = Field(0.5, ge=0.5, le=1, description="Drop pairs whose label is less sure than this.")
    dpo_label_smoothing: float | Literal["auto"] = Field(
        0.0, description="Robust-DPO label smoothing; 'auto' = mean uncertainty of the soft labels."
    )
    dpo_epochs: StrictInt = Field(1, ge=1)
    dpo_batch_size: StrictInt = Field(4, ge=1)
    dpo_learning_rate: float = Field(5e-6, gt=0)
    dpo_max_length: StrictInt = Field(512, ge=16)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


class EvalConfig(Strict):
    """``cai eval``: models side by side on held-out prompts, judged pairwise."""

    models: dict[str, str] | None = Field(
        None, description="name: model spec; null = the run's base, sl_cai, rl_cai_ppo and rl_cai_dpo models that exist."
    )
    red_team: PromptSetConfig = Field(default_factory=lambda: PromptSetConfig(split="test", limit=32))
    helpfulness: PromptSetConfig = Field(default_factory=lambda: PromptSetConfig(source="helpfulness", split="test", limit=32))
    judge: ModelConfig | None = Field(None, description="Judge model; null = the feedback model (label.feedback_model, else model).")
    sampling: SamplingConfig = _sampling(max_new_tokens=96, temperature=0.0)
    bootstrap: StrictInt = Field(200, ge=0, description="Bootstrap resamples for the Elo intervals.")
    transcripts: StrictInt = Field(6, ge=0, description="Sample transcripts (prompt -> critique -> revision -> RL answer) for the report.")
    revision_curve_traces: StrictInt = Field(64, ge=0, description="SL traces scored by the PM for the revision curve.")
    mc_files: list[str] = Field(default_factory=list, description="Multiple-choice JSONL files to score the judge on.")


class RunConfig(Strict):
    """One whole pipeline run: ``cai run CONFIG`` and each stage command read this."""

    name: str = Field("demo", description="Run name: outputs go to <runs_dir>/<name>/.")
    runs_dir: str = "runs"
    seed: StrictInt = 0
    constitution: str = Field("default", description="Built-in constitution name or a YAML file.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The helpful model CAI starts from.")
    critique: CritiqueConfig = Field(default_factory=CritiqueConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    label: LabelConfig = Field(default_factory=LabelConfig)
    pm: PMConfig = Field(default_factory=PMConfig)
    rl: RLConfig = Field(default_factory=RLConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name
