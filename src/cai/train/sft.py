"""SL-CAI: supervised fine-tuning on the constitution-guided revisions.

Why our own loop and not TRL's SFTTrainer: on CPUs the trainer's defaults (bf16, activation
checkpointing) ran ~12x slower, and even tuned it was 1.43x slower than a plain loop here; the
loop below is short, resumable, and runs under ``accelerate launch`` unchanged (DDP/FSDP/
DeepSpeed through accelerate). The critique stage's rows are also TRL-ready (``messages``), so a
user who prefers SFTTrainer can point it at ``runs/<name>/critique/data.jsonl`` directly.

    cai sft -c configs/demo.yaml          # after `cai critique -c configs/demo.yaml`
"""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from cai.config import RunConfig, SFTConfig
from cai.config_loader import config_to_yaml
from cai.errors import CaiError
from cai.io import JsonlWriter, read_jsonl, write_text_atomic
from cai.models import load_model
from cai.progress import progress_bar
from cai.runs import StageRun
from cai.train.answer_loss import answer_loss, answer_tokens, pad_batch, tokenize_for_answer_loss
from cai.train.batching import batches_for_rank, micro_batch_tokens, split_by_tokens, total_steps
from cai.train.checkpoints import load_checkpoint, save_checkpoint
from cai.train.lora import apply_lora
from cai.train.model_folder import count_parameters, save_model_folder, write_model_card
from cai.train.optim import LRSchedule, make_optimizer_and_schedule, optimizer_step
from cai.train.trackers import make_trackers
from cai.types import Chat


def build_sft_examples(
    critique_rows: list[dict[str, Any]],
    helpful_chats: list[Chat],
    *,
    revisions: str = "final",
    helpfulness_ratio: float = 0.25,
    seed: int = 0,
) -> tuple[list[Chat], dict[str, int]]:
    """The SL-CAI training mix: prompt + revision chats, plus helpfulness chats at a ratio.

    Args:
        critique_rows: rows of the critique stage's ``data.jsonl``.
        helpful_chats: prompt + answer chats (the model's own answers to helpfulness prompts, or
            the user's SFT data).
        revisions: ``final`` (one example per prompt) or ``all`` (every round's distinct revision,
            as in the paper).
        helpfulness_ratio: the share of helpfulness examples in the mix, capped by how many exist.

    Returns:
        (chats, counts) with counts of harmlessness and helpfulness examples, and of rows skipped
        because every one of their revisions was rejected (their final answer is the original).
    """
    harmless: list[Chat] = []
    unrevised = 0
    for row in critique_rows:
        if row["rounds"] and all(rnd["kept_previous"] for rnd in row["rounds"]):
            unrevised += 1  # every revision was rejected: the final answer is the unrevised original
            continue
        if revisions == "all":
            seen: set[str] = set()
            for rnd in row["rounds"]:
                if not rnd["kept_previous"] and rnd["revision"] not in seen:
                    seen.add(rnd["revision"])
                    harmless.append([*row["prompt"], {"role": "assistant", "content": rnd["revision"]}])
        else:
            harmless.append(row["messages"])
    mix, counts = mix_with_helpfulness(harmless, helpful_chats, helpfulness_ratio=helpfulness_ratio, seed=seed)
    return mix, {**counts, "unrevised_rows_skipped": unrevised}


def mix_with_helpfulness(
    harmless: list[Chat], helpful_chats: list[Chat], *, helpfulness_ratio: float, seed: int = 0,
) -> tuple[list[Chat], dict[str, int]]:
    """Harmlessness chats plus a seeded sample of helpfulness chats, so that these are
    ``helpfulness_ratio`` of the mix (capped by how many exist), shuffled.

    SL-CAI and the distill baseline both train on this mix, so only their harmlessness data differs.
    Chats with an empty answer are left out of both parts.

    Returns:
        (chats, counts) with counts of harmlessness and helpfulness examples.
    """
    harmless = [c for c in harmless if c[-1]["content"].strip()]
    rng = random.Random(f"{seed}:sft-mix")
    wanted = round(helpfulness_ratio / (1 - helpfulness_ratio) * len(harmless)) if helpfulness_ratio else 0
    pool = [c for c in helpful_chats if c and c[-1]["role"] == "assistant" and c[-1]["content"].strip()]
    helpful = rng.sample(pool, min(wanted, len(pool)))
    mix = harmless + helpful
    rng.shuffle(mix)
    return mix, {"harmlessness_examples": len(harmless), "helpfulness_examples": len(helpful)}


def write_train_data(path: Path, examples: list[Chat]) -> None:
    """The chats a model is trained on, as TRL-ready ``messages`` rows (written whole, atomically)."""
    write_text_atomic(path, "".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in examples))


def train_sft(
    examples: list[Chat],
    *,
    model_spec: str,
    out_dir: str | Path,
    config: SFTConfig,
    seed: int = 0,
    device: str = "auto",
    trust_remote_code: bool = False,
    show_progress: bool = True,
    stage: str = "sft",
) -> dict[str, Any]:
    """Fine-tune ``model_spec`` on ``examples`` (loss on the final assistant turn only).

    Saves an HF model folder to ``out_dir`` (LoRA merged when asked) plus ``train_log.jsonl``;
    keeps a resumable checkpoint in ``out_dir/checkpoint`` every ``save_every`` steps, which a
    rerun picks up. Returns metrics (steps, losses, tokens/s). ``stage`` names the progress bar
    and the trackers' project (``cai-<stage>``), for the stages other than ``sft`` that train this way.
    """
    out_dir = Path(out_dir)
    run = _setup(examples, model_spec, out_dir / "checkpoint", config, seed, device, trust_remote_code)
    main = run.accelerator.is_main_process
    started = time.perf_counter()
    log = JsonlWriter(out_dir / "train_log.jsonl", fsync=False)
    trackers = make_trackers(config.report_to, out_dir, f"cai-{stage}", config.model_dump(mode="json")) if main else []
    with progress_bar(stage, run.total_steps, enabled=show_progress and main) as advance:
        advance(run.step, 0)
        for epoch in range(config.epochs):
            for group in _untrained_groups(run, epoch):
                tokens_before = run.tokens
                step_loss = _train_step(run, group)
                elapsed = run.seconds_before + time.perf_counter() - started
                if main:
                    record = {"step": run.step, "epoch": epoch, "loss": round(step_loss, 5),
                              "lr": run.optimizer.param_groups[0]["lr"], "tokens": run.tokens, "seconds": round(elapsed, 2)}
                    log.write(record)
                    for tracker in trackers:
                        tracker.log({k: v for k, v in record.items() if k != "step"}, step=run.step)
                advance(1, run.tokens - tokens_before)  # the real (unpadded) tokens of this step
                if run.step % config.save_every == 0 and run.step < run.total_steps and main:
                    save_checkpoint(run.checkpoint, run.accelerator.unwrap_model(run.model), run.optimizer,
                                    {"step": run.step, "tokens": run.tokens, "seconds": elapsed})
    log.close()
    for tracker in trackers:
        tracker.finish()
    run.accelerator.wait_for_everyone()
    elapsed = run.seconds_before + time.perf_counter() - started
    metrics = _metrics(run, elapsed)  # before saving merges a LoRA adapter into the weights
    if main:
        _save(run, out_dir)
    return metrics


@dataclass
class _SFTRun:
    """What the SFT loop works on, made by `_setup`, and how far it has got (``step``, ``tokens``, ``losses``)."""

    config: SFTConfig
    seed: int
    accelerator: Any
    model: Any
    tokenizer: Any
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    schedule: LRSchedule
    data: list[tuple[list[int], list[int]]]
    """(token ids, labels) per example, labels -100 outside the answer."""
    total_steps: int
    """Optimizer steps this rank takes in all."""
    budget: int | None
    """Most padded tokens in one forward pass (`micro_batch_tokens`)."""
    checkpoint: Path
    step: int
    tokens: int
    seconds_before: float
    """Training seconds spent before a resume."""
    losses: list[float] = field(default_factory=list)


def _setup(examples: list[Chat], model_spec: str, checkpoint: Path, config: SFTConfig, seed: int, device: str,
           trust_remote_code: bool) -> _SFTRun:
    """Load the model (with LoRA when asked), tokenize the examples, and make the optimizer, resumed from ``checkpoint``."""
    from accelerate import Accelerator

    torch.manual_seed(seed)
    loaded = load_model(model_spec, dtype=config.dtype, device=device, trust_remote_code=trust_remote_code)
    tokenizer = loaded.tokenizer
    accelerator = Accelerator(cpu=loaded.device.type == "cpu")
    data = [t for t in (tokenize_for_answer_loss(tokenizer, c, config.max_length) for c in examples) if t]
    if not data:
        raise CaiError("no SFT examples left after tokenizing: every one was empty or had no answer tokens within "
                       "max_length; check the stage's train_data.jsonl (made from critique's, or distill's, answers)")
    model = apply_lora(loaded.model, config.lora)
    if config.activation_checkpointing:
        model.activation_checkpointing_enable()
    model.train()
    # Steps per rank: each takes 1/num_processes of every epoch's batches.
    steps = total_steps(len(data), config.batch_size * accelerator.num_processes, config.gradient_accumulation,
                        config.epochs, config.max_steps)
    params, optimizer, schedule = make_optimizer_and_schedule(
        model, learning_rate=config.learning_rate, weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio, steps=steps)
    state = load_checkpoint(checkpoint, model, optimizer) or {"step": 0, "tokens": 0, "seconds": 0.0}
    model, optimizer = accelerator.prepare(model, optimizer)
    return _SFTRun(config=config, seed=seed, accelerator=accelerator, model=model, tokenizer=tokenizer, params=params,
                   optimizer=optimizer, schedule=schedule, data=data, total_steps=steps,
                   budget=micro_batch_tokens(config.micro_batch_tokens, loaded.device), checkpoint=checkpoint,
                   step=state["step"], tokens=state["tokens"], seconds_before=state["seconds"])


def _untrained_groups(run: _SFTRun, epoch: int) -> Iterator[list[list[int]]]:
    """This rank's batches of one epoch, ``gradient_accumulation`` to a group (one optimizer step each).

    The epoch's order is shuffled from the seed, so a resumed run sees the same batches and skips
    the steps trained before it stopped; it stops once ``run.step`` reaches the total.
    """
    accelerator, accum = run.accelerator, run.config.gradient_accumulation
    order = list(range(len(run.data)))
    random.Random(f"{run.seed}:sft-epoch:{epoch}").shuffle(order)
    batches = batches_for_rank(order, run.config.batch_size, accelerator.num_processes, accelerator.process_index)
    steps_per_epoch = -(-len(batches) // accum)  # the last group may be smaller; it still trains
    for index in range(0, len(batches), accum):
        if epoch * steps_per_epoch + index // accum < run.step:
            continue  # already trained before the resume
        if run.step >= run.total_steps:
            return
        yield batches[index:index + accum]


def _train_step(run: _SFTRun, group: list[list[int]]) -> float:
    """One optimizer step over a group of batches (gradients accumulated); returns the step's loss."""
    micro_losses = []
    for micro in group:
        rows = [run.data[i] for i in micro]
        # The batch's loss is the mean over its answer tokens; each piece adds its share of it.
        answer = [answer_tokens(labels) for _, labels in rows]
        for piece in split_by_tokens([len(ids) for ids, _ in rows], run.budget):
            batch = {k: v.to(run.accelerator.device)
                     for k, v in pad_batch([rows[i] for i in piece], run.tokenizer.pad_token_id).items()}
            share = sum(answer[i] for i in piece) / max(1, sum(answer))
            loss = answer_loss(run.model, batch) * share / len(group)
            run.accelerator.backward(loss)
            micro_losses.append(loss.item())
            run.tokens += int(batch["attention_mask"].sum())
    optimizer_step(run.optimizer, run.params, max_grad_norm=run.config.max_grad_norm, lr=run.schedule.lr(run.step),
                   accelerator=run.accelerator)
    run.step += 1
    step_loss = sum(micro_losses)
    run.losses.append(step_loss)
    return step_loss


def _save(run: _SFTRun, out_dir: Path) -> None:
    """Save the trained model folder (main process) and drop the checkpoint it no longer needs."""
    unwrapped = run.accelerator.unwrap_model(run.model)
    unwrapped.eval()
    save_model_folder(unwrapped, run.tokenizer, out_dir)
    shutil.rmtree(run.checkpoint, ignore_errors=True)


def _metrics(run: _SFTRun, elapsed: float) -> dict[str, Any]:
    """Steps, losses (first, last, and the means of the first and last quarter), tokens/s and parameter counts."""
    losses = run.losses
    quarter = max(1, len(losses) // 4)
    total, trainable = count_parameters(run.accelerator.unwrap_model(run.model))
    return {
        "steps": run.step,
        "examples": len(run.data),
        "first_loss": round(losses[0], 4) if losses else None,
        "last_loss": round(losses[-1], 4) if losses else None,
        "mean_loss_first_quarter": round(sum(losses[:quarter]) / len(losses[:quarter]), 4) if losses else None,
        "mean_loss_last_quarter": round(sum(losses[-quarter:]) / len(losses[-quarter:]), 4) if losses else None,
        "tokens": run.tokens,
        "seconds": round(elapsed, 2),
        "tokens_per_s": round(run.tokens / elapsed, 1) if elapsed else None,
        "parameters": total,
        "trainable_parameters": trainable,
    }


def run_sft(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``sft``: fine-tune the starting model on its revisions (+ helpfulness answers), into ``sft/``."""
    st = StageRun(cfg, "sft", shard)
    extra = read_sft_file(cfg.sft.extra_data) if cfg.sft.extra_data else []
    source = st.require("critique")
    if st.skip():
        return st.dir
    critique_rows = read_jsonl(source / "data.jsonl")
    helpful_chats = [r["messages"] for r in read_jsonl(source / "helpfulness.jsonl")] + extra
    examples, counts = build_sft_examples(critique_rows, helpful_chats, revisions=cfg.sft.revisions,
                                          helpfulness_ratio=cfg.sft.helpfulness_ratio, seed=cfg.seed)
    if not examples:
        raise CaiError(f"no usable revisions in {source / 'data.jsonl'}; the critique stage produced nothing to train on")
    st.start(model=cfg.model.name, **counts)
    write_train_data(st.dir / "train_data.jsonl", examples)
    metrics = train_sft(examples, model_spec=cfg.model.name, out_dir=st.dir, config=cfg.sft, seed=cfg.seed,
                        device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code,
                        show_progress=show_progress)
    write_model_card(
        st.dir, title=f"SL-CAI model of run '{cfg.name}'", base_model=cfg.model.name,
        summary=(f"Supervised Constitutional AI model: `{cfg.model.name}` fine-tuned on its own revisions of "
                 f"red-team answers under the `{cfg.constitution}` constitution, mixed with its answers to "
                 "helpfulness prompts. Made by cai."),
        facts={"constitution": cfg.constitution, "critique rounds": cfg.critique.rounds,
               "revisions used": cfg.sft.revisions, **counts, **{k: v for k, v in metrics.items() if v is not None}},
        config_yaml=config_to_yaml(cfg),
    )
    st.done(**counts, **metrics)
    return st.dir


def read_sft_file(path: str) -> list:
    """Chats from a user's own SFT file (``messages`` rows ending with an assistant turn).

    Raises:
        CaiError: the file is missing or a row isn't such a chat (named by row).
    """
    if not Path(path).is_file():
        raise CaiError(f"sft.extra_data file {path} does not exist")
    chats = []
    for i, row in enumerate(read_jsonl(path), start=1):
        messages = row.get("messages") if isinstance(row, dict) else None
        if not isinstance(messages, list) or not messages or messages[-1].get("role") != "assistant":
            raise CaiError(f"{path} row {i} needs a 'messages' list ending with an assistant message")
        chats.append(messages)
    return chats
