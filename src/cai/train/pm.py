"""The preference model (PM): a scalar score per (conversation, response), trained on soft AI labels.

Loss: soft-label Bradley-Terry, cross-entropy between sigmoid(r_a - r_b) and the AI label p_a
(`cai.losses.bradley_terry`). Data: AI harmlessness labels mixed with helpfulness comparisons at
a ratio: the user's human comparisons (hh-rlhf ``chosen``/``rejected``) when given, otherwise AI
labels under the helpfulness question. Held-out pairs (split by prompt, so both orders of one
prompt never straddle train and eval) give accuracy and expected calibration error.

`RewardScorer` is the one scorer used wherever a PM score is needed: PPO rewards, evaluation of
responses, and the revision curve (STYLE: one scorer serves evaluation and reward).
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from cai.config import PMConfig, RunConfig
from cai.config_loader import config_to_yaml
from cai.data.comparisons import read_comparisons
from cai.errors import CaiError
from cai.eval.verdict import describe_pm
from cai.io import JsonlWriter, read_jsonl, write_json_atomic
from cai.losses.bradley_terry import expected_calibration_error, preference_accuracy, soft_bradley_terry_loss
from cai.models import load_model
from cai.padding import pad_rows
from cai.progress import progress_bar
from cai.prompts import format_conversation
from cai.runs import StageRun
from cai.stats import wilson_interval
from cai.train.batching import batches_for_rank, micro_batch_tokens, split_by_tokens, total_steps
from cai.train.lora import apply_lora
from cai.train.model_folder import count_parameters, save_model_folder, write_model_card
from cai.train.optim import LRSchedule, make_optimizer_and_schedule, optimizer_step
from cai.train.trackers import make_trackers
from cai.types import Chat


@dataclass(frozen=True)
class Pair:
    """One comparison: two responses to one conversation and P(A is better)."""

    prompt: Chat
    response_a: str
    response_b: str
    p_a: float
    group: str
    """Pairs with the same group (source prompt) go to the same side of the train/eval split."""
    kind: str = "harmlessness"


def render_pm_input(tokenizer: Any, prompt: Chat, response: str) -> str:
    """The text the PM scores: the conversation plus the response as the final assistant turn."""
    chat = [*prompt, {"role": "assistant", "content": response}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(chat, tokenize=False)
    return format_conversation(chat)


class RewardScorer:
    """Scores (conversation, response) pairs with a sequence-classification model, batched.

    Right padding with position ids from 0, so a row's score never depends on its batch.
    """

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int = 1024) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length
        config = getattr(model, "module", model).config  # through a DDP wrapper when distributed
        if config.pad_token_id is None:
            config.pad_token_id = tokenizer.pad_token_id
        self.pad_id = config.pad_token_id

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "auto", **kwargs: Any) -> RewardScorer:
        from transformers import AutoModelForSequenceClassification

        loaded = load_model(str(folder), model_class=AutoModelForSequenceClassification, num_labels=1, device=device)
        return cls(loaded.model, loaded.tokenizer, **kwargs)

    def encode(self, prompts: Sequence[Chat], responses: Sequence[str]) -> list[list[int]]:
        texts = [render_pm_input(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [row[-self.max_length:] for row in ids]  # keep the end: the response is what's judged

    def forward(self, rows: Sequence[list[int]]) -> torch.Tensor:
        """Scores [B] for token rows (with gradients if enabled)."""
        device = next(self.model.parameters()).device
        ids, mask = pad_rows(rows, self.pad_id, "right")
        return self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, 0].float()

    @torch.no_grad()
    def score(self, prompts: Sequence[Chat], responses: Sequence[str]) -> list[float]:
        """PM score of each response to its conversation (higher = preferred)."""
        was_training = self.model.training
        self.model.eval()
        rows = self.encode(prompts, responses)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        scores = [0.0] * len(rows)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            for i, value in zip(batch, self.forward([rows[i] for i in batch]).tolist()):
                scores[i] = value
        self.model.train(was_training)
        return scores


def pairs_from_labels(rows: list[dict[str, Any]]) -> list[Pair]:
    """Pairs from the label stage's ``data.jsonl`` rows (AI labels); a pair the judge abstained on trains nothing."""
    return [Pair(r["prompt"], r["response_a"], r["response_b"], float(r["p_a"]), r.get("source_id", r["id"]),
                 "helpfulness" if r.get("set") == "helpfulness" else "harmlessness") for r in rows
            if not r.get("abstained")]


def pairs_from_human_comparisons(source: str, kind: str = "helpfulness") -> list[Pair]:
    """Hard-labelled pairs (the preferred answer as A, p_a = 1) from human comparisons.

    Args:
        source: hh-rlhf ``chosen``/``rejected`` transcripts, ``prompt``/``chosen``/``rejected`` rows, or
            ``gold:<split>`` (`cai.data.comparisons.read_comparisons` reads all three).
        kind: what the pairs teach, ``helpfulness`` or ``harmlessness`` (of the gold pairs, that axis's).

    Returns:
        Pairs grouped by their conversation, so the train/eval split never puts one prompt on both sides.

    Raises:
        CaiError: an unreadable source or a malformed row (named).
    """
    return [Pair(c.context, c.chosen, c.rejected, 1.0, c.group, c.axis) for c in read_comparisons(source, kind)]


def mix_and_split(ai_pairs: list[Pair], human_pairs: list[Pair], config: PMConfig,
                  seed: int) -> tuple[list[Pair], list[Pair], dict[str, int]]:
    """Harmlessness pairs + helpfulness pairs at ``helpfulness_ratio``; split train/eval by group."""
    rng = random.Random(f"{seed}:pm-mix")
    harmless = [p for p in ai_pairs if p.kind == "harmlessness"]
    ai_helpful = [p for p in ai_pairs if p.kind == "helpfulness"]
    ratio = config.helpfulness_ratio
    pool = len(ai_helpful) + len(human_pairs)
    wanted = min(pool, round(ratio / (1 - ratio) * len(harmless)) if ratio and harmless else (pool if ratio else 0))
    # Human comparisons mix with the AI helpfulness labels at pm.human_ratio; a side that runs short
    # is topped up from the other, so the helpfulness share holds.
    from_human = min(len(human_pairs), round(wanted * config.human_ratio)) if human_pairs else 0
    from_ai = min(len(ai_helpful), wanted - from_human)
    from_human = min(len(human_pairs), wanted - from_ai)
    helpful = rng.sample(human_pairs, from_human) + rng.sample(ai_helpful, from_ai)
    pairs = harmless + helpful
    train, held_out = split_by_group(pairs, config.eval_fraction, rng)
    counts = {"harmlessness_pairs": len(harmless), "helpfulness_pairs": len(helpful), "human_helpfulness_pairs": from_human,
              "helpfulness_source": "+".join(n for n, k in (("human", from_human), ("ai", from_ai)) if k) or "none", "train_pairs": len(train), "eval_pairs": len(held_out)}
    return train, held_out, counts


def split_by_group(pairs: list[Pair], eval_fraction: float, rng: random.Random) -> tuple[list[Pair], list[Pair]]:
    """(train, held-out): about ``eval_fraction`` of the groups held out whole, the train pairs shuffled."""
    groups = sorted({p.group for p in pairs})
    rng.shuffle(groups)
    n_eval = max(1, round(eval_fraction * len(groups))) if len(groups) > 1 and eval_fraction else 0
    eval_groups = set(groups[:n_eval])
    train = [p for p in pairs if p.group not in eval_groups]
    held_out = [p for p in pairs if p.group in eval_groups]
    rng.shuffle(train)
    return train, held_out


def evaluate_pm(scorer: RewardScorer, pairs: list[Pair], n_bootstrap: int = 200, seed: int = 0) -> dict[str, Any]:
    """Held-out accuracy (vs the label's side) and ECE, each with its n and 95% interval, and a calibration table.

    The accuracy's n is the pairs with a preferred side (labels of exactly 0.5 have none); its
    interval is Wilson's. The ECE's interval is a seeded percentile bootstrap over the pairs.
    """
    if not pairs:
        return {"accuracy": None, "accuracy_ci": None, "accuracy_n": 0, "ece": None, "ece_ci": None,
                "calibration": [], "pairs": 0}
    a = torch.tensor(scorer.score([p.prompt for p in pairs], [p.response_a for p in pairs]))
    b = torch.tensor(scorer.score([p.prompt for p in pairs], [p.response_b for p in pairs]))
    target = torch.tensor([p.p_a for p in pairs])
    pred = torch.sigmoid(a - b)
    ece, table = expected_calibration_error(pred, target)
    accuracy, n = preference_accuracy(a, b, target), int((target != 0.5).sum())
    generator = torch.Generator().manual_seed(seed)
    resampled = sorted(expected_calibration_error(pred[i], target[i])[0]
                       for i in torch.randint(len(pairs), (n_bootstrap, len(pairs)), generator=generator))
    return {"accuracy": None if math.isnan(accuracy) else accuracy,
            "accuracy_ci": list(wilson_interval(accuracy * n, n)) if n else None, "accuracy_n": n,
            "ece": ece, "ece_ci": [resampled[int(0.025 * (n_bootstrap - 1))], resampled[int(0.975 * (n_bootstrap - 1))]],
            "calibration": table, "pairs": len(pairs), "mean_margin": float((a - b).abs().mean())}


def train_preference_model(
    train: list[Pair], held_out: list[Pair], *, base: str, out_dir: str | Path, config: PMConfig, seed: int = 0,
    device: str = "auto", show_progress: bool = True,
) -> dict[str, Any]:
    """Train a scalar-head PM on soft labels; save the HF folder, ``metrics.json`` and a log."""
    if not train:
        raise CaiError("no preference pairs to train on; label more pairs or lower pm.eval_fraction")
    out_dir = Path(out_dir)
    run = _setup(base, len(train), config, seed, device)
    main = run.accelerator.is_main_process
    before = evaluate_pm(run.scorer, held_out)
    log = JsonlWriter(out_dir / "train_log.jsonl", fsync=False)
    trackers = make_trackers(config.report_to, out_dir, "cai-pm", config.model_dump(mode="json")) if main else []
    run.model.train()
    started = time.perf_counter()
    with progress_bar("preference model", run.total_steps, enabled=show_progress and main) as advance:
        for epoch in range(config.epochs):
            order = list(range(len(train)))
            random.Random(f"{seed}:pm-epoch:{epoch}").shuffle(order)
            for indices in batches_for_rank(order, config.batch_size, run.accelerator.num_processes,
                                            run.accelerator.process_index):
                loss_value, tokens = _train_step(run, [train[i] for i in indices])
                if main:
                    record = {"step": run.step, "epoch": epoch, "loss": round(loss_value, 5),
                              "lr": run.optimizer.param_groups[0]["lr"], "seconds": round(time.perf_counter() - started, 2)}
                    log.write(record)
                    for tracker in trackers:
                        tracker.log({k: v for k, v in record.items() if k != "step"}, step=run.step)
                advance(1, tokens)
    log.close()
    after = evaluate_pm(run.scorer, held_out)
    for tracker in trackers:
        tracker.log({"eval_accuracy": after["accuracy"], "eval_ece": after["ece"]}, step=run.step)
        tracker.finish()
    metrics = {"steps": run.step, "train_pairs": len(train), "eval_pairs": len(held_out),
               "first_loss": round(run.losses[0], 4), "last_loss": round(run.losses[-1], 4),
               "eval_accuracy_before": before["accuracy"], "eval_accuracy_before_ci": before["accuracy_ci"],
               "eval_accuracy": after["accuracy"], "eval_accuracy_ci": after["accuracy_ci"],
               "eval_accuracy_n": after["accuracy_n"], "eval_ece": after["ece"], "eval_ece_ci": after["ece_ci"],
               "eval_mean_margin": after.get("mean_margin")}
    return _save(run, out_dir, metrics, after["calibration"], started)


@dataclass
class _PMRun:
    """What the PM loop works on, made by `_setup`, and how far it has got (``step``, ``losses``)."""

    accelerator: Any
    model: Any
    tokenizer: Any
    scorer: RewardScorer
    """Scores rows with the model being trained (the same scorer measures it before and after)."""
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    total_steps: int
    """Optimizer steps this rank takes in all."""
    budget: int | None
    """Most padded tokens in one forward pass (`micro_batch_tokens`)."""
    max_grad_norm: float
    step: int = 0
    losses: list[float] = field(default_factory=list)


def _setup(base: str, n_train: int, config: PMConfig, seed: int, device: str) -> _PMRun:
    """Load the base model with a scalar head (and LoRA when asked), and make its optimizer and scorer."""
    from accelerate import Accelerator
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    loaded = load_model(base, dtype=config.dtype, device=device, model_class=AutoModelForSequenceClassification,
                        num_labels=1)
    accelerator = Accelerator(cpu=loaded.device.type == "cpu")
    model = apply_lora(loaded.model, config.lora)
    # Steps per rank: each takes 1/num_processes of every epoch's batches.
    steps = total_steps(n_train, config.batch_size * accelerator.num_processes, 1, config.epochs, None)
    params, optimizer, schedule = make_optimizer_and_schedule(
        model, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio, steps=steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    scorer = RewardScorer(model, loaded.tokenizer, batch_size=config.batch_size, max_length=config.max_length)
    return _PMRun(accelerator=accelerator, model=model, tokenizer=loaded.tokenizer, scorer=scorer, params=params,
                  optimizer=optimizer, schedule=schedule, total_steps=steps,
                  budget=micro_batch_tokens(config.micro_batch_tokens, loaded.device), max_grad_norm=config.max_grad_norm)


def _train_step(run: _PMRun, batch: list[Pair]) -> tuple[float, int]:
    """One optimizer step on a batch of pairs.

    Returns:
        (the batch's loss, the real tokens of its rows, no padding).
    """
    rows_a = run.scorer.encode([p.prompt for p in batch], [p.response_a for p in batch])
    rows_b = run.scorer.encode([p.prompt for p in batch], [p.response_b for p in batch])
    # A pair is two rows of one forward pass: the budget is halved, the longer row counts.
    longest = [max(len(a), len(b)) for a, b in zip(rows_a, rows_b)]
    loss_value = 0.0
    for piece in split_by_tokens(longest, max(1, run.budget // 2) if run.budget else None):
        scores = run.scorer.forward([rows_a[i] for i in piece] + [rows_b[i] for i in piece])
        r_a, r_b = scores[: len(piece)], scores[len(piece):]
        p_a = torch.tensor([batch[i].p_a for i in piece], device=scores.device)
        # The batch's loss is the mean over its pairs; each piece adds its share of it.
        loss = soft_bradley_terry_loss(r_a, r_b, p_a) * len(piece) / len(batch)
        run.accelerator.backward(loss)
        loss_value += loss.item()
    optimizer_step(run.optimizer, run.params, max_grad_norm=run.max_grad_norm, lr=run.schedule.lr(run.step),
                   accelerator=run.accelerator)
    run.step += 1
    run.losses.append(loss_value)
    return loss_value, sum(len(a) + len(b) for a, b in zip(rows_a, rows_b))


def _save(run: _PMRun, out_dir: Path, metrics: dict[str, Any], calibration: list[dict[str, Any]],
          started: float) -> dict[str, Any]:
    """Save the model folder and ``metrics.json`` (main process); returns ``metrics`` with time and parameter counts."""
    run.accelerator.wait_for_everyone()
    model = run.accelerator.unwrap_model(run.model)
    model.eval()
    total, trainable = count_parameters(model)  # before saving merges a LoRA adapter away
    if run.accelerator.is_main_process:
        save_model_folder(model, run.tokenizer, out_dir)
    metrics = {**metrics, "seconds": round(time.perf_counter() - started, 2), "parameters": total,
               "trainable_parameters": trainable}
    if run.accelerator.is_main_process:
        write_json_atomic(out_dir / "metrics.json", {**metrics, "calibration": calibration})
    return metrics


def run_pm(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``pm``: the preference model on the AI labels (+ helpfulness comparisons), into ``pm/``."""
    from rich.console import Console

    st = StageRun(cfg, "pm", shard)
    human = pairs_from_human_comparisons(cfg.pm.human_data) if cfg.pm.human_data else []
    source = st.require("label")
    if st.skip():
        return st.dir
    train, held_out, counts = mix_and_split(pairs_from_labels(read_jsonl(source / "data.jsonl")), human, cfg.pm, cfg.seed)
    base = cfg.pm.base or cfg.model.name
    st.start(model=base, **counts)
    metrics = train_preference_model(train, held_out, base=base, out_dir=st.dir, config=cfg.pm, seed=cfg.seed,
                                     device=cfg.model.device, show_progress=show_progress)
    write_model_card(st.dir, title=f"Preference model of run '{cfg.name}'", base_model=base,
                     summary=("Scalar-head preference model trained with a soft-label Bradley-Terry loss on AI "
                              f"feedback under the `{cfg.constitution}` constitution. Made by cai."),
                     facts={**counts, **metrics}, config_yaml=config_to_yaml(cfg))
    Console(stderr=True).print(f"pm: {describe_pm(metrics)}")
    st.done(**{**counts, **metrics})
    return st.dir
