"""Typed configs: YAML files plus ``key=value`` overrides, checked before any model loads.

Every config class forbids unknown keys, so a typo (``temprature: 0.7``) fails at once with a
sentence that names the key and the keys that are allowed there. Overrides use dotted keys and
YAML values: ``sampling.temperature=0.7``, ``model.name=path/to/model``, ``sampling.stop=["\\n\\n"]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator
from pydantic.fields import FieldInfo

from cai.types import SamplingParams

DType = Literal["auto", "float32", "bfloat16", "float16"]
_DTYPE = "Weights and compute dtype; 'auto' = float32 on CPU (bf16 is ~70x slower there), bf16 on CUDA."


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
    dtype: DType = Field("auto", description=_DTYPE)
    device: str = Field("auto", description="'auto', 'cpu' or 'cuda[:N]'.")
    batch_size: StrictInt = Field(16, ge=1, description="Rows per forward pass.")
    reuse_prefix: bool = Field(True, description="Compute a shared prompt prefix's KV cache once and reuse it.")
    cascade: bool = Field(
        True, description=("With reuse_prefix: keep the prefix's K/V once for the whole batch and attend to it in one "
                           "product per step, instead of a copy per row (hf backend; exact, and falls back where the "
                           "model's attention can't take it)."))
    compile_decode: bool = Field(
        False, description=("hf backend: decode a lone row (a batch of one) on a static KV cache with a compiled step; "
                            "faster per token after a one-time compile (tens of seconds on a small CPU) per window."))
    trust_remote_code: bool = Field(False, description="Run code shipped with a hub model. Off unless you trust it.")
    allow_pickle: bool = Field(False, description="Accept pickle (.bin) weights, which can run code when loaded.")
    base_urls: list[str] = Field(default_factory=list, description="http backend: server URLs (round-robin), e.g. http://gpu1:8000/v1.")
    api_key_env: str = Field("OPENAI_API_KEY", description="http backend: environment variable holding the API key (never the key itself).")
    http_mode: Literal["chat", "completion"] = Field("chat", description="http backend: which endpoint generation uses.")
    tokenizer: str | None = Field(None, description="http backend: local tokenizer (model spec) to render chats for scoring.")
    concurrency: StrictInt = Field(8, ge=1, description="http backend: requests in flight.")
    timeout_s: float = Field(60.0, gt=0, description="http backend: seconds per request.")
    max_retries: StrictInt = Field(5, ge=0, description="http backend: retries on 429/5xx/connection errors.")
    cache_dir: str | None = Field(
        None, description=("http backend: folder keeping every server answer by request (path and body, never the key), "
                           "so a rerun sends nothing twice; null = no cache."))
    tensor_parallel: StrictInt = Field(1, ge=1, description="vllm backend: GPUs per model.")

    @model_validator(mode="after")
    def _http_needs_urls(self) -> "ModelConfig":
        if self.backend == "http" and not self.base_urls:
            # "{key}" becomes this section's dotted name (model, eval.judge, ...) in the error sentence.
            raise ValueError("{key}.backend is http but {key}.base_urls is empty; give the server URLs "
                             "(e.g. {key}.base_urls=[\"http://localhost:8000/v1\"])")
        return self


class SamplingConfig(Strict):
    """How continuations are sampled (see `cai.types.SamplingParams`)."""

    max_new_tokens: StrictInt = Field(128, ge=1, description="Hard cap on generated tokens per output.")
    temperature: float = Field(0.0, ge=0, description="0 = greedy; otherwise logits are divided by it.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 = off).")
    top_k: StrictInt = Field(0, ge=0, description="Keep only the k most likely tokens (0 = off).")
    seed: StrictInt = Field(0, description="Base seed; each row's generator derives from it and the row.")
    stop: list[str] = Field(default_factory=list, description="Strings that end an output (cut before them).")

    def params(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, seed=self.seed, stop=tuple(self.stop),
        )


class GenerateConfig(Strict):
    """``cai generate``: answer a list of prompts with one model."""

    model: ModelConfig = Field(default_factory=ModelConfig, description="The model that answers.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="How answers are sampled.")


class PromptSetConfig(Strict):
    """Where a stage's prompts come from."""

    source: str = Field("red-team", description="Built-in set (red-team, helpfulness), a file, a dataset folder or hf:NAME.")
    split: str | None = Field("train", description="Keep rows of this split only (null: all rows).")
    limit: StrictInt | None = Field(None, ge=1, description="Use at most this many prompts.")
    too_long: Literal["truncate_left", "drop"] = Field(
        "truncate_left", description="Prompts that don't fit the context: drop their oldest turns, or drop them."
    )


def _sampling(description: str, **kw: Any) -> Any:
    return Field(default_factory=lambda: SamplingConfig(**kw), description=description)


class CritiqueConfig(Strict):
    """``cai critique``: the helpful model answers red-team prompts, then critiques and revises."""

    prompts: PromptSetConfig = Field(default_factory=PromptSetConfig, description="Red-team prompts to answer, critique and revise.")
    helpfulness: PromptSetConfig | None = Field(
        default_factory=lambda: PromptSetConfig(source="helpfulness", limit=64),
        description="Prompts the model simply answers, to mix into SL-CAI training; null to skip.",
    )
    rounds: StrictInt = Field(4, ge=1, description="Critique/revision rounds per prompt (the paper used 4).")
    max_examples: StrictInt | None = Field(
        None, ge=0, description="Use only the first N few-shot examples of the constitution (shorter prompts, faster)."
    )
    mode: Literal["critique_revision", "revision", "rewrite"] = Field(
        "critique_revision",
        description="'critique_revision' = the paper's critique then revision (for capable models); 'revision' = revise "
                    "without a critique (the paper's ablation); 'rewrite' = answer the user again with the draft and the "
                    "principle in a system turn, which small instruct models follow far better.",
    )
    rewrite_lead: str = Field(
        "", description="Rewrite mode: words the reply is prefilled with (the model continues them; they stay in the revision)."
    )
    candidates: StrictInt = Field(
        1, ge=1, description="Revisions sampled per round; the first that passes the checks is kept (best-of-n)."
    )
    accept: Literal["checks", "judge"] = Field(
        "checks", description=("Which revisions are kept: 'checks' = those that pass the structural checks (not empty, "
                               "looping, commentary, copied or unchanged); 'judge' = of those, only the ones the critic, "
                               "asked as a judge (accept_method, both orders, a sampled feedback principle), prefers to "
                               "the answer they would replace, the most preferred of the candidates."))
    accept_method: Literal["mc", "mc-cot", "votes"] = Field(
        "mc", description="accept=judge: the judging method (votes and chain of thought at label's defaults).")
    prompt_format: Literal["auto", "chat", "text"] = Field(
        "auto", description="'chat' uses the model's chat template, 'text' a plain transcript; 'auto' picks chat when there is a template."
    )
    critic: ModelConfig | None = Field(None, description="Model that critiques and revises; null = the same model.")
    response: SamplingConfig = _sampling("Sampling of the initial answer.", max_new_tokens=128, temperature=0.7, top_p=0.9)
    critique_sampling: SamplingConfig = _sampling("Sampling of each critique.", max_new_tokens=96, temperature=0.7, top_p=0.9)
    revision_sampling: SamplingConfig = _sampling("Sampling of each revision.", max_new_tokens=128, temperature=0.7, top_p=0.9)
    chunk_size: StrictInt = Field(16, ge=1, description="Rows generated together and then written; a crash loses at most one chunk.")


class LoraConfig(Strict):
    """Low-rank adapters (peft) instead of full fine-tuning.

    The saved model always has the adapter merged in (every backend loads it as is); the adapter
    alone is kept in the stage folder's ``adapter/``.
    """

    enabled: bool = Field(False, description="Train adapters instead of every weight.")
    r: StrictInt = Field(16, ge=1, description="Adapter rank.")
    alpha: StrictInt = Field(32, ge=1, description="Adapter scaling numerator (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: list[str] | str = Field("all-linear", description="Module names, or 'all-linear'.")


def _default(base: type[Strict], name: str, default: Any) -> Any:
    """``base``'s field ``name``, its checks and description kept, with another default."""
    return FieldInfo.merge_field_infos(base.model_fields[name], default=default)


class OwnLoopConfig(Strict):
    """What every stage trained by cai's own loop (SFT, PM, PPO) shares: gradient clipping, adapters,
    dtype and trackers (logged through accelerate). Each field is documented here once."""

    max_grad_norm: float = Field(1.0, gt=0, description="Clip the gradient's global norm to this.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Also log to these trackers (through accelerate)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Train low-rank adapters instead of every weight.")
    dtype: DType = Field("auto", description=_DTYPE)


class SupervisedTrainingConfig(OwnLoopConfig):
    """What SFT and the preference model share besides `OwnLoopConfig`: AdamW with a linear warmup
    and decay, and micro-batches.

    Each field is documented here once; the two stages differ only in some defaults.
    """

    learning_rate: float = Field(2e-5, gt=0, description="Peak AdamW learning rate (linear warmup, then linear decay).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="Share of the steps spent warming the learning rate up.")
    micro_batch_tokens: StrictInt | None = Field(
        None, ge=1, description=("Most padded tokens in one forward pass: a larger batch is split into micro-batches whose "
                                 "gradients add up to the same update, bounding activation memory (about 1.8 MB per token "
                                 "for a 135M model in fp32). null = 512 on a CPU, no limit on a GPU.")
    )


class SFTConfig(SupervisedTrainingConfig):
    """``cai sft``: supervised fine-tuning on the revisions (SL-CAI)."""

    revisions: Literal["final", "all"] = Field(
        "final", description="Train on the final revision only, or on every round's revision (as the paper did)."
    )
    helpfulness_ratio: float = Field(
        0.25, ge=0, lt=1, description="Share of helpfulness rows in the training mix (capped by what exists)."
    )
    extra_data: str | None = Field(None, description="A user's own SFT data (chat 'messages' rows) to mix in as helpfulness data.")
    epochs: StrictInt = Field(1, ge=1, description="Passes over the training mix.")
    max_steps: StrictInt | None = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: StrictInt = Field(4, ge=1, description="Examples per batch (per process); see micro_batch_tokens.")
    gradient_accumulation: StrictInt = Field(1, ge=1, description="Forward passes per optimizer step.")
    max_length: StrictInt = Field(512, ge=16, description="Tokens per example; longer ones are cut from the left of the prompt.")
    save_every: StrictInt = Field(50, ge=1, description="Optimizer steps between resumable checkpoints.")
    activation_checkpointing: bool = Field(False, description="Trade compute for memory; only when memory asks for it.")


class SampleConfig(Strict):
    """``cai sample``: K responses per prompt from the policy, to be labelled by AI feedback."""

    policy: str | None = Field(None, description="Model to sample from; null = this run's SL-CAI model (sft/).")
    prompts: PromptSetConfig = Field(default_factory=lambda: PromptSetConfig(limit=256), description="Red-team prompts to sample answers for.")
    helpfulness: PromptSetConfig | None = Field(
        default_factory=lambda: PromptSetConfig(source="helpfulness", limit=64),
        description="Helpfulness prompts whose pairs are labelled under the helpfulness question; null to skip.",
    )
    k: StrictInt = Field(2, ge=2, description="Responses per prompt.")
    rlcd: bool = Field(
        False, description=("RLCD contrast pairs (for label.method=rlcd): each red-team prompt gets one answer under a "
                            "system turn with a feedback principle's 'follow' statement and one under its 'violate' "
                            "statement (the constitution's rlcd pairs), the first preferred by construction; needs k=2. "
                            "Helpfulness prompts are sampled as usual."))
    sampling: SamplingConfig = _sampling("Sampling of the K answers (needs temperature > 0 to differ).", max_new_tokens=128, temperature=1.0, top_p=0.95)
    chunk_size: StrictInt = Field(16, ge=1, description="Prompts sampled together and then written; a crash loses at most one chunk.")

    @model_validator(mode="after")
    def _rlcd_is_a_pair(self) -> "SampleConfig":
        if self.rlcd and self.k != 2:
            raise ValueError(f"{{key}}.rlcd samples exactly two answers per prompt (one per statement), so "
                             f"{{key}}.k must be 2, not {self.k}")
        return self


LabelMethod = Literal["auto", "mc", "mc-cot", "votes", "rlcd"]


class LabelConfig(Strict):
    """``cai label``: soft AI preference labels for the sampled pairs, by a judging method (`cai.judging`)."""

    feedback_model: ModelConfig | None = Field(None, description="Feedback model; null = the run's starting model.")
    pairing: Literal["consecutive", "all"] = Field("consecutive", description="Which response pairs to label per prompt.")
    principles_per_label: StrictInt = Field(1, ge=1, description="Ensemble size: principles drawn and averaged per pair.")
    swap: bool = Field(True, description="Ask in both orders (A,B) and (B,A) and average, cancelling position bias.")
    method: LabelMethod = Field(
        "auto", description=("How the feedback model's preference is read: 'mc' = (A)/(B) log-probabilities; 'mc-cot' = "
                             "the same after a chain of thought; 'votes' = sampled written verdicts, for servers without "
                             "log-probs; 'rlcd' = no judge, pairs preferred by construction (needs sample.rlcd); "
                             "'auto' = measure mc, mc-cot and votes on gold_check dev pairs and use the best of those "
                             "that clear chance, or the cheapest when none does."))
    auto_methods: list[Literal["mc", "mc-cot", "votes"]] = Field(
        default_factory=lambda: ["mc", "mc-cot", "votes"], min_length=1,
        description="The methods 'auto' measures (those the backend can run), cheapest first on a tie.")
    clamp: tuple[float, float] = Field((0.4, 0.6), description="mc-cot probabilities are clamped to this band.")
    votes: StrictInt = Field(5, ge=1, description="votes: verdicts sampled per question and order.")
    vote_cot: bool = Field(False, description="votes: each verdict follows a chain of thought of its own.")
    vote_sampling: SamplingConfig = _sampling("votes: sampling of each written verdict.", max_new_tokens=8, temperature=0.7)
    hard: bool = Field(False, description="Round labels to 0/1.")
    cot_sampling: SamplingConfig = _sampling("Sampling of the chain-of-thought reasoning.", max_new_tokens=96, temperature=0.0)
    prompt_format: Literal["auto", "chat", "text"] = Field(
        "auto", description="'chat' uses the feedback model's chat template, 'text' a plain transcript; 'auto' picks chat when there is a template."
    )
    helpfulness_question: str = Field(
        "Which response is more helpful: more accurate, relevant, clear and useful to the human?",
        description="Question for pairs from helpfulness prompts.",
    )
    chunk_size: StrictInt = Field(16, ge=1, description="Pairs labelled together and then written; a crash loses at most one chunk.")
    gold_check: StrictInt = Field(
        32, ge=0, description=("Before labelling, check the feedback model on this many gold dev pairs by the same "
                               "procedure; 'auto' measures every method on them (0 = skip; 'auto' then uses mc).")
    )


class PMConfig(SupervisedTrainingConfig):
    """``cai pm``: a scalar-head preference model trained on the soft AI labels."""

    base: str | None = Field(None, description="Model the PM starts from; null = the run's starting model.")
    helpfulness_ratio: float = Field(0.25, ge=0, lt=1, description="Share of helpfulness comparisons in the mix.")
    human_data: str | None = Field(None, description=("Human comparisons to mix into the helpfulness pairs: hh-rlhf chosen/"
                                                      "rejected transcripts, prompt/chosen/rejected rows or gold:<split>."))
    human_ratio: float = Field(
        0.5, ge=0, le=1, description="With human_data: share of the helpfulness pairs drawn from it (the rest are AI-labelled)."
    )
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="Share of prompts held out for accuracy and calibration.")
    epochs: StrictInt = Field(2, ge=1, description="Passes over the comparisons.")
    batch_size: StrictInt = Field(8, ge=1, description="Comparisons per optimizer step (per process).")
    learning_rate: float = _default(SupervisedTrainingConfig, "learning_rate", 3e-5)
    max_length: StrictInt = Field(512, ge=16, description="Tokens per prompt + answer; longer ones are cut from the left.")


class RolloutPromptsConfig(Strict):
    """What PPO, RLOO and GRPO share: the prompts the policy answers in rollouts, and the held-out
    prompts whose mean reward from the preference model shows whether training helps."""

    prompts: PromptSetConfig = Field(default_factory=lambda: PromptSetConfig(limit=None),
                                     description="Red-team prompts the policy answers in rollouts.")
    helpfulness: PromptSetConfig | None = Field(default_factory=lambda: PromptSetConfig(source="helpfulness", limit=None),
                                                description="Helpfulness prompts mixed into rollouts; null to skip.")
    helpfulness_ratio: float = Field(0.25, ge=0, lt=1, description="Share of helpfulness prompts among the rollout prompts.")
    eval_prompts: PromptSetConfig = Field(
        default_factory=lambda: PromptSetConfig(split="test", limit=16),
        description="Held-out prompts whose mean PM reward (greedy answers) is measured before, during and after training.",
    )


class PPOConfig(RolloutPromptsConfig, OwnLoopConfig):
    """``cai ppo``: PPO of the SL-CAI policy against the preference model, with a KL penalty to SL-CAI."""

    steps: StrictInt = Field(20, ge=1, description="PPO iterations (rollout batch + optimisation).")
    rollout_batch: StrictInt = Field(8, ge=1, description="Prompts per PPO iteration.")
    epochs: StrictInt = Field(2, ge=1, description="Optimisation passes over each rollout batch.")
    minibatch: StrictInt = Field(4, ge=1, description="Rollouts per gradient step within a pass.")
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate of the policy and value head.")
    sampling: SamplingConfig = _sampling("Sampling of rollouts (temperature 1 samples the policy itself).", max_new_tokens=64, temperature=1.0, top_p=1.0)
    kl_coef: float = Field(0.05, ge=0, description="beta: per-token KL penalty to the SL-CAI policy, subtracted from the reward.")
    kl_estimator: Literal["k1", "k2", "k3", "abs"] = Field(
        "k1", description="Per-token KL estimate in the penalty: k1 = log-ratio, k2 = half squared log-ratio, k3 = low-variance unbiased, abs = |log-ratio|."
    )
    adaptive_kl: bool = Field(False, description="Adapt beta toward kl_target (Ziegler et al. 2019).")
    kl_target: float = Field(6.0, gt=0, description="Adaptive KL: the KL (nats per answer) beta is steered toward.")
    kl_horizon: StrictInt = Field(10000, ge=1, description="Adaptive KL: rollouts over which beta adapts; larger = slower.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount per token in GAE (1 = undiscounted, as for one reward per answer).")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda: 0 = one-step TD advantages (low variance), 1 = Monte Carlo returns.")
    clip_range: float = Field(0.2, gt=0, description="PPO ratio clip epsilon for the policy loss.")
    clip_range_value: float = Field(0.2, gt=0, description="Clip of the value prediction's change per update, for the value loss.")
    value_coef: float = Field(0.1, ge=0, description="Weight of the value loss next to the policy loss.")
    entropy_coef: float = Field(0.0, ge=0, description="Weight of an entropy bonus (0 = none).")
    reward_clip: float | None = Field(5.0, gt=0, description="Clip normalised PM rewards to +-this; null = no clip.")
    normalize_reward: bool = Field(True, description="Normalise PM scores with running mean/std.")
    eval_every: StrictInt = Field(10, ge=1, description="Iterations between held-out reward measurements.")
    save_every: StrictInt = Field(10, ge=1, description="Iterations between resumable checkpoints.")


class DPOConfig(Strict):
    """``cai dpo``: DPO (through TRL) of the SL-CAI policy on the AI-labelled pairs, the cheaper alternative to PPO."""

    beta: float = Field(0.1, gt=0, description="DPO beta: how far the policy may move from the SL-CAI reference.")
    min_confidence: float = Field(0.5, ge=0.5, le=1, description="Drop pairs whose label is less sure than this.")
    label_smoothing: float | Literal["auto"] = Field(
        0.0, description="Robust-DPO label smoothing; 'auto' = mean uncertainty of the soft labels."
    )
    epochs: StrictInt = Field(1, ge=1, description="Passes over the labelled pairs.")
    batch_size: StrictInt = Field(4, ge=1, description="Pairs per optimizer step.")
    learning_rate: float = Field(5e-6, gt=0, description="AdamW learning rate.")
    max_length: StrictInt = Field(512, ge=16, description="Tokens per prompt + answer; longer ones are truncated.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Also log to these trackers (TRL's report_to)."
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Train low-rank adapters instead of every weight.")
    dtype: DType = Field("auto", description=_DTYPE)


class VLLMRolloutConfig(Strict):
    """TRL's vLLM rollouts for RLOO and GRPO (GPU only; needs ``pip install vllm``). Each key is TRL's ``vllm_<key>``."""

    enabled: bool = Field(False, description="Generate rollouts with vLLM instead of transformers' generate (TRL's use_vllm).")
    mode: Literal["colocate", "server"] = Field(
        "colocate", description="'colocate': vLLM shares the training GPUs in this process; 'server': a separate "
                                "`trl vllm-serve` process on its own GPUs.")
    server_base_url: str | None = Field(None, description="Server mode: the server's URL (e.g. http://gpu1:8000); overrides host and port.")
    server_host: str = Field("0.0.0.0", description="Server mode: host of the vLLM server.")
    server_port: StrictInt = Field(8000, ge=1, le=65535, description="Server mode: port of the vLLM server.")
    server_timeout: float = Field(240.0, gt=0, description="Server mode: seconds to wait for the server to come up.")
    gpu_memory_utilization: float = Field(0.3, gt=0, le=1, description="Colocate mode: share of each GPU's memory vLLM may take.")
    tensor_parallel_size: StrictInt = Field(1, ge=1, description="Colocate mode: GPUs each vLLM engine spans.")
    max_model_length: StrictInt | None = Field(None, ge=16, description="vLLM's context window (prompt + answer); null = the model's.")
    enable_sleep_mode: bool = Field(False, description="Colocate mode: offload vLLM's weights and cache during optimisation steps.")

    def trl_kwargs(self) -> dict[str, Any]:
        """These settings under their names in TRL's RLOOConfig / GRPOConfig."""
        kwargs = {f"vllm_{key}": value for key, value in self.model_dump().items() if key != "enabled"}
        return {"use_vllm": self.enabled, **kwargs}


class OnlineRLConfig(RolloutPromptsConfig):
    """What RLOO and GRPO share: sample several answers per prompt, score them with the preference model,
    and push the policy toward the better ones, with a KL penalty to the SL-CAI model."""

    steps: StrictInt = Field(20, ge=1, description="Optimizer steps; a fresh batch of rollouts every `iterations` steps.")
    prompts_per_step: StrictInt = Field(4, ge=1, description="Prompts per optimizer step, per process; each is answered `generations` times.")
    generations: StrictInt = Field(4, ge=2, description="Answers sampled per prompt: the group whose rewards are compared.")
    max_new_tokens: StrictInt = Field(64, ge=1, description="Hard cap on tokens per sampled answer (TRL's max_completion_length).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of rollouts (1 samples the policy itself).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass of rollouts (1 = off).")
    top_k: StrictInt = Field(0, ge=0, description="Keep only the k most likely tokens in rollouts (0 = off).")
    beta: float = Field(0.05, ge=0, description="KL coefficient to the SL-CAI reference (0 = no reference model, no KL).")
    learning_rate: float = Field(1e-6, gt=0, description="Peak AdamW learning rate (TRL's linear decay).")
    iterations: StrictInt = Field(1, ge=1, description="Optimisation passes over each batch of rollouts (TRL's num_iterations, mu).")
    clip_range: float = Field(0.2, gt=0, description="Ratio clip epsilon when iterations > 1 (TRL's epsilon).")
    max_grad_norm: float = Field(1.0, gt=0, description="Clip the gradient's global norm to this.")
    eval_every: StrictInt = Field(10, ge=1, description="Steps between held-out reward measurements.")
    save_every: StrictInt = Field(50, ge=1, description="Steps between resumable checkpoints (TRL's save_steps).")
    activation_checkpointing: bool = Field(False, description="Trade compute for memory; only when memory asks for it.")
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list, description="Also log to these trackers (TRL's report_to)."
    )
    vllm: VLLMRolloutConfig = Field(default_factory=VLLMRolloutConfig, description="vLLM rollouts on GPUs (TRL's vllm_* options).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Train low-rank adapters instead of every weight.")
    dtype: DType = Field("auto", description=_DTYPE)


class RLOOConfig(OnlineRLConfig):
    """``cai rloo``: REINFORCE leave-one-out (TRL's RLOOTrainer) against the preference model: each answer's
    advantage is its reward minus the mean reward of the other answers to the same prompt."""

    normalize_advantages: bool = Field(False, description="Scale advantages to mean 0, std 1 over each batch.")


class GRPOConfig(OnlineRLConfig):
    """``cai grpo``: group relative policy optimisation (TRL's GRPOTrainer) against the preference model: each
    answer's advantage is its reward minus its group's mean, scaled by the group's spread."""

    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the reward std of the group, of the whole batch, or not at all (Dr. GRPO).")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo", description="How token losses are averaged: per answer (grpo), by a constant (dr_grpo), or by the "
                            "tokens in the batch (dapo, bnpo), TRL's loss_type.")


RLAlgo = Literal["ppo", "dpo", "rloo", "grpo"]
"""The RL-CAI methods, each one stage (`cai.runs.RL_STAGES`), in the order a run trains them."""
_RL_ALGOS: tuple[str, ...] = get_args(RLAlgo)


def rl_algorithms(algo: str | list[str] | tuple[str, ...]) -> list[str]:
    """The RL stages an ``rl.algo`` value picks, deduplicated, in pipeline order.

    ``algo`` is one name, a list of names, a comma-separated string (``ppo,rloo``, as ``cai rl --algo``
    takes it), or ``both`` (= ppo and dpo, the meaning it had before rloo and grpo existed).

    Raises:
        ValueError: an unknown name, or an empty list; the sentence names the allowed values.
    """
    names = [part.strip() for part in algo.split(",")] if isinstance(algo, str) else list(algo)
    names = [n for name in names for n in (("ppo", "dpo") if name == "both" else (name,))]
    unknown = [n for n in names if n not in _RL_ALGOS]
    if unknown or not names:
        what = f"unknown rl.algo {', '.join(repr(str(n)) for n in unknown)}" if unknown else "rl.algo names no algorithm"
        raise ValueError(f"{what}; choose {', '.join(_RL_ALGOS)}, a list of them (e.g. [ppo, rloo]) or both (= ppo and dpo)")
    return [n for n in _RL_ALGOS if n in names]


class RLConfig(Strict):
    """RL-CAI: which algorithms run (``cai rl``), and each one's settings."""

    algo: list[RLAlgo] = Field(
        default_factory=lambda: ["ppo"],
        description="RL methods to train side by side: one of ppo, dpo, rloo, grpo or a list ([ppo, rloo]); "
                    "'both' = [ppo, dpo].",
    )
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO against the preference model (stage 'ppo').")
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO on the AI labels (stage 'dpo').")
    rloo: RLOOConfig = Field(default_factory=RLOOConfig, description="RLOO against the preference model (stage 'rloo', TRL).")
    grpo: GRPOConfig = Field(default_factory=GRPOConfig, description="GRPO against the preference model (stage 'grpo', TRL).")

    @field_validator("algo", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        """One name, a list of names or 'both', as the list of RL stages in pipeline order."""
        if isinstance(value, str) or (isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)):
            return rl_algorithms(value)
        return value  # a wrong type: pydantic's own sentence names it


class OverRefusalConfig(Strict):
    """XSTest-format prompts for `cai eval`'s over-refusal and harm rates (see `cai.eval.refusal`)."""

    source: str = Field(description=("A file or dataset of rows with 'prompt' and 'label' (safe/unsafe) or 'type' "
                                     "(contrast_* = unsafe): .csv, .jsonl, .json, .parquet, a save_to_disk folder "
                                     "or hf:NAME, e.g. XSTest's xstest_prompts.csv."))
    split: str | None = Field(None, description="For a saved DatasetDict or an hf: source, the split to load (null: train).")
    limit: StrictInt | None = Field(
        None, ge=1, description="Use at most this many prompts: safe and unsafe in turn, each from its types in turn (null: all).")


class EvalConfig(Strict):
    """``cai eval``: models side by side on held-out prompts, judged pairwise."""

    models: dict[str, str] | None = Field(
        None, description="name: model spec; null = the run's base model and the sft, ppo, dpo, rloo and grpo models that exist."
    )
    red_team: PromptSetConfig = Field(default_factory=lambda: PromptSetConfig(split="test", limit=32),
                                      description="Held-out red-team prompts every model answers.")
    helpfulness: PromptSetConfig = Field(default_factory=lambda: PromptSetConfig(source="helpfulness", split="test", limit=32),
                                         description="Held-out helpfulness prompts every model answers.")
    judge: ModelConfig | None = Field(None, description="Judge model; null = the feedback model (label.feedback_model, else model).")
    judge_methods: Literal["all", "used"] = Field(
        "all", description=("Check the judge on the test gold pairs by every method of label.auto_methods ('all', the "
                            "report's method table) or only by the one the run labelled with ('used', cheaper)."))
    sampling: SamplingConfig = _sampling("Sampling of the models' answers (greedy by default).", max_new_tokens=96, temperature=0.0)
    bootstrap: StrictInt = Field(200, ge=0, description="Bootstrap resamples for the Elo intervals.")
    transcripts: StrictInt = Field(6, ge=0, description="Sample transcripts (prompt -> critique -> revision -> RL answer) for the report.")
    revision_curve_traces: StrictInt = Field(64, ge=0, description="SL traces scored by the PM for the revision curve.")
    mc_files: list[str] = Field(default_factory=list, description="Multiple-choice JSONL files to score the judge on.")
    over_refusal: OverRefusalConfig | None = Field(
        None, description=("XSTest-format prompts (safe look-alikes, unsafe contrasts) every model answers: the share of "
                           "refusals on safe ones and of compliance on unsafe ones; null = not measured."))
    gold_pairs: str = Field("gold", description="Human-labelled comparison pairs: 'gold' (built in) or a JSONL file (see cai.data.gold).")
    gold_split: Literal["dev", "test"] | None = Field("test", description="Which split of the gold pairs to measure on (null: all).")
    gold_limit: StrictInt | None = Field(
        None, ge=1, description="Score each model on at most this many gold pairs, spread over kinds (null: all)."
    )
    judge_gold_limit: StrictInt | None = Field(
        None, ge=1, description="Check the judge on at most this many gold pairs, spread over kinds (null: all)."
    )


Baseline = Literal["distill", "rlhf"]
"""The comparison rows a reviewer asks for, each one stage and model folder (``baselines: [distill, rlhf]``)."""


class DistillConfig(Strict):
    """``cai distill`` (a baseline): SFT on the critic's own answers, no critique and no revision.

    The critic answers the same red-team and helpfulness prompts as SL-CAI (``critique.prompts``,
    ``critique.helpfulness``) with the constitution's principles in its system turn, and the model is
    trained with the same settings (``sft``): only the data differs, so the row measures what the
    critique-and-revise loop adds over asking the critic to be careful (Sharma et al. 2024).
    """

    system: str | None = Field(
        None, description="System turn the critic answers under; null = the constitution's critique principles, listed.")
    response: SamplingConfig | None = Field(None, description="Sampling of the critic's answers; null = critique.response.")


class RLHFConfig(Strict):
    """``cai rlhf`` (a baseline): a preference model on human comparisons only, then the same RL as RL-CAI.

    Comparisons are hh-rlhf rows (``chosen``/``rejected`` transcripts that share all but the last
    turn), ``prompt``/``chosen``/``rejected`` rows, or ``gold:dev`` / ``gold:test`` (the built-in
    gold pairs of that split, the helpfulness pairs as helpful data and the rest as harmless data).
    The preference model uses ``pm``'s settings and the RL uses ``rl.ppo`` / ``rl.dpo``'s: same budget.
    """

    variant: Literal["helpful", "helpful-harmless"] = Field(
        "helpful-harmless", description="'helpful' trains on helpful_data only (the paper's helpful-only RLHF); "
                                        "'helpful-harmless' on both.")
    helpful_data: str | None = Field("gold:dev", description="Helpfulness comparisons: a file, saved dataset, hf: id or gold:<split>.")
    harmless_data: str | None = Field("gold:dev", description="Harmlessness comparisons (used by 'helpful-harmless'); same forms.")
    algo: Literal["ppo", "dpo"] = Field("ppo", description="RL against the human-label PM (ppo) or DPO on the comparisons.")
    policy: Literal["base", "sft"] = Field(
        "base", description=("Where RL starts: the base model (RLHF as usually run) or 'sft', the policy RL-CAI starts "
                             "from (the SL-CAI model, or sample.policy), so that only the labels differ."))


class RunConfig(Strict):
    """One whole pipeline run: ``cai run CONFIG`` and each stage command read this."""

    name: str = Field("demo", description="Run name: outputs go to <runs_dir>/<name>/.")
    runs_dir: str = Field("runs", description="Folder that holds the runs.")
    seed: StrictInt = Field(0, description="Base seed: every sample, principle draw and split derives from it.")
    constitution: str = Field("default", description="Built-in constitution name or a YAML file.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The helpful model CAI starts from.")
    critique: CritiqueConfig = Field(default_factory=CritiqueConfig, description="Stage 'critique'.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="Stage 'sft'.")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="Stage 'sample'.")
    label: LabelConfig = Field(default_factory=LabelConfig, description="Stage 'label'.")
    pm: PMConfig = Field(default_factory=PMConfig, description="Stage 'pm'.")
    rl: RLConfig = Field(default_factory=RLConfig, description="Stages 'ppo', 'dpo', 'rloo' and 'grpo'.")
    baselines: list[Baseline] = Field(
        default_factory=list, description="Baseline stages to train beside RL-CAI and compare in eval: distill, rlhf.")
    distill: DistillConfig = Field(default_factory=DistillConfig, description="Stage 'distill' (a baseline).")
    rlhf: RLHFConfig = Field(default_factory=RLHFConfig, description="Stage 'rlhf' (a baseline).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Stage 'eval'.")

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / self.name
