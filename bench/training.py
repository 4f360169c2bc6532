"""Benchmark: cai's training loops side by side with the TRL trainer a careful user would run instead.

In one process, on the same model, data, batch size, lengths, learning rate and number of steps:

- **SFT**: `cai.train.sft.train_sft` vs TRL ``SFTTrainer`` (prompt-completion rows, so the loss is on
  the answer as in cai; fp32, no activation checkpointing, padded batches: padding-free needs
  FlashAttention, which CPUs lack; no eval, logging and saving off, dataloader workers 0).
  Real (non-padding) tokens/s, and MFU = 6 N T / seconds / fp32 matmul peak, with N counted with
  and without the embedding matrix, the peak measured here on the same threads.
- **PM**: `cai.train.pm.train_preference_model` vs TRL ``RewardTrainer`` on the same pairs (hard
  labels, so both minimise -log sigmoid(r_chosen - r_rejected)). Only the training steps are timed.
- **DPO**: cai's stage *is* TRL's ``DPOTrainer`` (set to fp32 and no checkpointing on CPU), so it is
  one row, not a comparison.
- **RL**: one cai PPO iteration per step (`cai.train.ppo.train_ppo`, one optimizer step over the
  rollout batch) vs TRL ``RLOOTrainer`` and ``GRPOTrainer`` wired as `cai.train.online_rl` wires
  them, same reward model, samples per step, answer length cap and KL coefficient. Samples/s,
  with the time split into generation / PM scoring / the rest (log-probs and optimisation).
  The reward model is the PM the cai PM row has just trained.

Where a target is missed the notes say what bounds it (a forward / backward / optimizer split of
cai's SFT step, and the RL time splits). Figures go to bench/results/training.{json,md}.

    HF_HUB_OFFLINE=1 python bench/training.py            # ~7 minutes on 2 CPU cores
    HF_HUB_OFFLINE=1 python bench/training.py --quick    # ~2-3 minutes, writes training.quick.{json,md}
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from common import matmul_peak, result, row, stem, write_results

SENTENCES = [
    "Here is a clear answer to the question.",
    "The main idea is simple once the terms are defined.",
    "A practical example helps: start small, check the result, then extend it.",
    "Be careful with edge cases, such as empty input or very large values.",
    "If anything is unclear, say which part and I can explain it in more detail.",
    "In short, the approach works and is easy to test.",
]


@dataclass(frozen=True)
class Sizes:
    """How much work each comparison does (the same for cai and TRL)."""

    sft_examples: int
    sft_batch: int
    pm_pairs: int
    pm_batch: int
    dpo_pairs: int
    rl_steps: int
    prompts_per_step: int
    generations: int
    max_new_tokens: int
    grpo: bool
    profile_batches: int
    max_length: int = 256


FULL = Sizes(sft_examples=32, sft_batch=4, pm_pairs=16, pm_batch=4, dpo_pairs=8, rl_steps=3,
             prompts_per_step=2, generations=4, max_new_tokens=32, grpo=True, profile_batches=6)
QUICK = Sizes(sft_examples=8, sft_batch=4, pm_pairs=8, pm_batch=4, dpo_pairs=4, rl_steps=1,
              prompts_per_step=2, generations=2, max_new_tokens=24, grpo=False, profile_batches=4)


# -- Measuring ----------------------------------------------------------------------------------

def parameter_counts(model: Any) -> tuple[int, int]:
    """(all parameters, parameters without the input embedding matrix), each weight counted once."""
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def trainer_clock() -> Any:
    """A transformers callback timing training from ``on_train_begin`` to the last ``on_step_end``
    (so the trainer's setup, model loading and dataset tokenisation are not counted)."""
    from transformers import TrainerCallback

    class Clock(TrainerCallback):
        started = ended = 0.0

        def on_train_begin(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.started = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
            self.ended = time.perf_counter()

        @property
        def seconds(self) -> float:
            return self.ended - self.started

    return Clock()


def quiet(trainer: Any, clock: Any) -> Any:
    """Drop the trainer's printing callbacks, add ``clock``."""
    from transformers import PrinterCallback, ProgressCallback

    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    trainer.add_callback(clock)
    return trainer


def counting_collator(collator: Callable[[list], dict]) -> tuple[Callable[[list], dict], list[int]]:
    """``collator`` that also adds each batch's real (attention-mask) tokens to the returned list."""
    seen: list[int] = []

    def collate(examples: list) -> dict:
        batch = collator(examples)
        seen.append(int(batch["attention_mask"].sum()))
        return batch

    return collate, seen


def timed(fn: Callable, spent: list[float]) -> Callable:
    """``fn`` that adds its wall time to ``spent`` on each call."""
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent.append(time.perf_counter() - start)

    return wrapper


# -- Data ---------------------------------------------------------------------------------------

def answer(i: int) -> str:
    """A deterministic answer of 1-6 sentences, so batches hold rows of different lengths."""
    return " ".join(SENTENCES[(i + k) % len(SENTENCES)] for k in range(1 + i % 6))


def sft_chats(n: int) -> list[list[dict[str, str]]]:
    from cai.data import load_prompts

    rows, _ = load_prompts("helpfulness", limit=n)
    return [[*r.messages, {"role": "assistant", "content": answer(i)}] for i, r in enumerate(rows)]


def preference_pairs(n: int) -> list[tuple[list[dict[str, str]], str, str]]:
    """(prompt, chosen, rejected): a longer careful answer against a curt one."""
    from cai.data import load_prompts

    rows, _ = load_prompts("red-team", limit=n)
    return [(list(r.messages), answer(i + 3), "No. " + SENTENCES[i % len(SENTENCES)]) for i, r in enumerate(rows)]


# -- SFT ----------------------------------------------------------------------------------------

def bench_sft(sizes: Sizes, tmp: Path, peak: float, counts: tuple[int, int]) -> tuple[list[dict], list[str]]:
    from datasets import Dataset
    from trl import SFTConfig as TRLSFTConfig
    from trl import SFTTrainer

    from cai.config import SFTConfig
    from cai.models import load_model
    from cai.train.sft import train_sft

    chats = sft_chats(sizes.sft_examples)
    total, body = counts
    profile = sft_step_profile(chats, sizes, peak, body)
    lr = 2e-5
    cai = train_sft(chats, model_spec="bundled", out_dir=tmp / "sft", device="cpu", show_progress=False,
                    config=SFTConfig(epochs=1, batch_size=sizes.sft_batch, max_length=sizes.max_length,
                                     learning_rate=lr, warmup_ratio=0.0, save_every=10**6, dtype="float32"))

    loaded = load_model("bundled", dtype="float32", device="cpu")
    args = TRLSFTConfig(
        output_dir=str(tmp / "trl-sft"), per_device_train_batch_size=sizes.sft_batch, num_train_epochs=1,
        max_length=sizes.max_length, learning_rate=lr, lr_scheduler_type="linear", warmup_steps=0,
        max_grad_norm=1.0, bf16=False, use_cpu=True, activation_checkpointing=False, padding_free=False,
        packing=False, dataloader_num_workers=0, eval_strategy="no", logging_strategy="no",
        save_strategy="no", report_to=[], disable_tqdm=True, seed=0)
    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in chats]
    trainer = SFTTrainer(model=loaded.model, args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=loaded.tokenizer)
    trainer.data_collator, trl_tokens = counting_collator(trainer.data_collator)
    clock = trainer_clock()
    quiet(trainer, clock).train()
    trl_tps, cai_tps = sum(trl_tokens) / clock.seconds, cai["tokens"] / cai["seconds"]

    same = (f"{cai['steps']} vs {trainer.state.global_step} steps, {cai['tokens']} vs {sum(trl_tokens)} real tokens "
            f"(cai vs TRL), batch {sizes.sft_batch}, max_length {sizes.max_length}")
    mfu = lambda tps, n: 100 * 6 * n * tps / peak  # noqa: E731
    out = [
        row("sft cai tokens/s", cai_tps, "tokens/s", same, ratio_vs={"sft trl SFTTrainer tokens/s": cai_tps / trl_tps},
            target=">= 1.4x SFTTrainer", met=cai_tps >= 1.4 * trl_tps),
        row("sft trl SFTTrainer tokens/s", trl_tps, "tokens/s",
            f"{clock.seconds:.1f} s for {trainer.state.global_step} steps; padded batches (padding_free=False)"),
        row("sft cai MFU (N without embedding)", mfu(cai_tps, body), "%", f"N = {body / 1e6:.1f}M",
            target=">= 60%", met=mfu(cai_tps, body) >= 60),
        row("sft cai MFU (N with embedding)", mfu(cai_tps, total), "%", f"N = {total / 1e6:.1f}M"),
        row("sft trl MFU (N without embedding)", mfu(trl_tps, body), "%", f"N = {body / 1e6:.1f}M"),
    ]
    return out, [profile]


def sft_step_profile(chats: list, sizes: Sizes, peak: float, body: int) -> str:
    """Where cai's SFT step spends its time, over a few of the same batches: forward (and of it, the
    LM head + loss), backward, and the optimizer step, against the fused AdamW TRL uses. The two
    optimizers take turns; the first two batches (each optimizer's state allocation) are not timed.

    Run before the comparisons, it also warms the process (allocator, thread pool) for both sides.
    """
    from cai.models import load_model
    from cai.train.answer_loss import pad_batch, tokenize_for_answer_loss
    from cai.train.optim import make_optimizer_and_schedule, optimizer_step

    loaded = load_model("bundled", dtype="float32", device="cpu")
    model = loaded.model.train()
    data = [tokenize_for_answer_loss(loaded.tokenizer, c, sizes.max_length) for c in chats]
    batches = sizes.profile_batches
    params, optimizer, _ = make_optimizer_and_schedule(model, learning_rate=2e-5, weight_decay=0.0,
                                                       warmup_ratio=0.0, steps=batches)
    fused = torch.optim.AdamW(params, lr=2e-5, weight_decay=0.0, fused=True)
    spent = {"forward": 0.0, "backward": 0.0, "optimizer": 0.0, "fused optimizer": 0.0, "body forward": 0.0}
    tokens = padded = 0
    for b in range(batches):
        rows = [data[(b * sizes.sft_batch + k) % len(data)] for k in range(sizes.sft_batch)]
        batch = pad_batch(rows, loaded.tokenizer.pad_token_id)
        t0 = time.perf_counter()
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        t1 = time.perf_counter()  # what `model(**batch)` does, in two timed parts: decoder, then LM head + loss
        loss = model.loss_function(logits=model.lm_head(hidden), labels=batch["labels"],
                                   vocab_size=model.config.vocab_size)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        optimizer_step(optimizer if b % 2 == 0 else fused, params, max_grad_norm=1.0)
        t4 = time.perf_counter()
        if b < 2:
            continue  # warm-up
        tokens, padded = tokens + int(batch["attention_mask"].sum()), padded + batch["attention_mask"].numel()
        spent["body forward"] += t1 - t0
        spent["forward"] += t2 - t0
        spent["backward"] += t3 - t2
        spent["optimizer" if b % 2 == 0 else "fused optimizer"] += t4 - t3
    timed_batches = batches - 2
    foreach_steps, fused_steps = -(-timed_batches // 2), timed_batches // 2
    per_step = spent["optimizer"] / foreach_steps
    whole = spent["forward"] + spent["backward"] + per_step * timed_batches
    split = ", ".join(f"{k} {100 * v / whole:.0f}%" for k, v in
                      (("forward", spent["forward"]), ("backward", spent["backward"]), ("optimizer", per_step * timed_batches)))
    fused_note = (f"; TRL's fused AdamW step takes {spent['fused optimizer'] / fused_steps:.2f} s against "
                  f"{per_step:.2f} s for cai's" if fused_steps else "")
    return (f"SFT profile (cai's step, {timed_batches} timed batches of {sizes.sft_batch}): {split}{fused_note}. The LM head "
            f"and loss are {100 * (1 - spent['body forward'] / spent['forward']):.0f}% of the forward (cai builds the "
            f"full [B, T, 49152] logits; TRL's SFTTrainer computes log-probs in chunks). Forward runs at "
            f"{100 * 2 * body * padded / spent['forward'] / peak:.0f}% and backward at "
            f"{100 * 4 * body * padded / spent['backward'] / peak:.0f}% of the matmul peak counting padded positions "
            f"(non-embedding N); padding is {100 * (1 - tokens / padded):.0f}% of them. Attention, norms and "
            "activations at width 576 are memory-bound, not matmul-peak work.")


# -- Preference model ---------------------------------------------------------------------------

def bench_pm(sizes: Sizes, tmp: Path) -> tuple[list[dict], Path]:
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from cai.config import PMConfig
    from cai.io import read_jsonl
    from cai.models import load_model
    from cai.train.pm import Pair, RewardScorer, train_preference_model

    raw = preference_pairs(sizes.pm_pairs)
    lr = 3e-5
    pairs = [Pair(p, chosen, rejected, 1.0, str(i)) for i, (p, chosen, rejected) in enumerate(raw)]
    metrics = train_preference_model(
        pairs, [], base="bundled", out_dir=tmp / "pm", device="cpu", show_progress=False,
        config=PMConfig(epochs=1, batch_size=sizes.pm_batch, max_length=sizes.max_length, learning_rate=lr,
                        warmup_ratio=0.0, eval_fraction=0.0, dtype="float32"))
    cai_s = [r for r in read_jsonl(tmp / "pm" / "train_log.jsonl")][-1]["seconds"]  # training steps only
    scorer = RewardScorer.from_folder(tmp / "pm", device="cpu", max_length=sizes.max_length)
    cai_tokens = sum(len(r) for r in scorer.encode([p.prompt for p in pairs] * 2,
                                                   [p.response_a for p in pairs] + [p.response_b for p in pairs]))
    del scorer

    torch.manual_seed(0)
    loaded = load_model("bundled", dtype="float32", device="cpu", model_class=AutoModelForSequenceClassification,
                        num_labels=1)
    loaded.model.config.pad_token_id = loaded.tokenizer.pad_token_id
    args = RewardConfig(
        output_dir=str(tmp / "trl-pm"), per_device_train_batch_size=sizes.pm_batch, num_train_epochs=1,
        max_length=sizes.max_length, learning_rate=lr, warmup_steps=0, max_grad_norm=1.0, bf16=False,
        use_cpu=True, activation_checkpointing=False, dataloader_num_workers=0, eval_strategy="no",
        logging_strategy="no", save_strategy="no", report_to=[], disable_tqdm=True, seed=0)
    rows = [{"prompt": p, "chosen": [{"role": "assistant", "content": c}],
             "rejected": [{"role": "assistant", "content": r}]} for p, c, r in raw]
    trainer = RewardTrainer(model=loaded.model, args=args, train_dataset=Dataset.from_list(rows),
                            processing_class=loaded.tokenizer)
    trainer.data_collator, trl_tokens = counting_collator(trainer.data_collator)
    clock = trainer_clock()
    quiet(trainer, clock).train()
    cai_tps, trl_tps = cai_tokens / cai_s, sum(trl_tokens) / clock.seconds
    same = (f"{metrics['steps']} vs {trainer.state.global_step} steps, {cai_tokens} vs {sum(trl_tokens)} real tokens "
            f"(cai vs TRL), {len(pairs)} pairs, batch {sizes.pm_batch}; {cai_s:.1f} vs {clock.seconds:.1f} s")
    return [
        row("pm cai tokens/s", cai_tps, "tokens/s", same, ratio_vs={"pm trl RewardTrainer tokens/s": cai_tps / trl_tps},
            target=">= 1.0x RewardTrainer", met=cai_tps >= trl_tps),
        row("pm trl RewardTrainer tokens/s", trl_tps, "tokens/s", "hard labels: the same loss as cai's soft one at p=1"),
    ], tmp / "pm"


# -- DPO ----------------------------------------------------------------------------------------

def bench_dpo(sizes: Sizes, tmp: Path) -> dict[str, Any]:
    from cai.config import DPOConfig
    from cai.io import read_jsonl
    from cai.train.dpo import train_dpo

    labelled = [{"prompt": p, "chosen": [{"role": "assistant", "content": c}],
                 "rejected": [{"role": "assistant", "content": r}], "score": 1.0, "p_a": 1.0}
                for p, c, r in preference_pairs(sizes.dpo_pairs)]
    metrics = train_dpo(labelled, policy_spec="bundled", out_dir=tmp / "dpo", device="cpu",
                        config=DPOConfig(batch_size=4, max_length=sizes.max_length, label_smoothing=0.0,
                                         dtype="float32"))
    runtime = next(r["train_runtime"] for r in read_jsonl(tmp / "dpo" / "train_log.jsonl") if "train_runtime" in r)
    return row("dpo cai = TRL DPOTrainer pairs/s", metrics["pairs"] / runtime, "pairs/s",
               f"{metrics['pairs']} pairs, {metrics['steps']} steps, batch 4, {runtime:.1f} s (TRL's train_runtime)")


# -- RL -----------------------------------------------------------------------------------------

def bench_rl(sizes: Sizes, tmp: Path, pm_folder: Path) -> tuple[list[dict], list[str]]:
    from cai.config import PPOConfig, SamplingConfig
    from cai.data import load_prompts
    from cai.io import read_jsonl
    from cai.train.ppo import train_ppo

    prompts, _ = load_prompts("red-team", limit=16)
    per_step = sizes.prompts_per_step * sizes.generations
    config = PPOConfig(steps=sizes.rl_steps, rollout_batch=per_step, epochs=1, minibatch=per_step, kl_coef=0.05,
                       eval_every=10**6, save_every=10**6, dtype="float32",
                       sampling=SamplingConfig(max_new_tokens=sizes.max_new_tokens, temperature=1.0))
    train_ppo(prompts, [], [], policy_spec="bundled", pm_folder=pm_folder, out_dir=tmp / "ppo", config=config,
              device="cpu", show_progress=False)
    steps = [r for r in read_jsonl(tmp / "ppo" / "train_log.jsonl") if "gen_s" in r]
    split = {k: sum(r[k] for r in steps) for k in ("gen_s", "score_s", "opt_s")}
    ppo_s = sum(split.values())
    ppo_len = sum(r["response_length"] for r in steps) / len(steps)
    ppo_sps = per_step * len(steps) / ppo_s
    shape = (f"{len(steps)} steps x {per_step} samples, <= {sizes.max_new_tokens} new tokens, "
             f"mean answer {ppo_len:.1f} tokens")
    notes = [f"PPO time split: generation {split['gen_s']:.1f} s, PM scoring + old/reference log-probs "
             f"{split['score_s']:.1f} s, optimisation {split['opt_s']:.1f} s (one optimizer step per iteration, "
             "as RLOO/GRPO take one per batch)."]
    trl_rows = []
    for algo in ("rloo", "grpo") if sizes.grpo else ("rloo",):
        sps, length, note = trl_online(algo, sizes, tmp, pm_folder, [r.messages for r in prompts])
        trl_rows.append((algo, sps, length))
        notes.append(note)
    ratios = {f"{algo} trl samples/s": ppo_sps / sps for algo, sps, _ in trl_rows}
    rloo_sps = trl_rows[0][1]
    out = [row("ppo cai samples/s", ppo_sps, "samples/s", shape, ratio_vs=ratios,
               target=">= RLOOTrainer samples/s", met=ppo_sps >= rloo_sps)]
    for algo, sps, length in trl_rows:
        out.append(row(f"{algo} trl samples/s", sps, "samples/s",
                       f"{sizes.rl_steps} steps x {sizes.prompts_per_step} prompts x {sizes.generations} "
                       f"generations, mean answer {length:.1f} tokens"))
    return out, notes


def trl_online(algo: str, sizes: Sizes, tmp: Path, pm_folder: Path, prompts: list) -> tuple[float, float, str]:
    """TRL's RLOO or GRPO trainer as `cai.train.online_rl` builds it, timed step by step.

    Returns:
        (samples/s, mean answer length, a note splitting the time into generation / scoring / rest).
    """
    import trl
    from datasets import Dataset

    from cai.config import GRPOConfig, RLOOConfig
    from cai.models import load_model
    from cai.train.online_rl import pm_reward, trl_config
    from cai.train.pm import RewardScorer

    section = (RLOOConfig if algo == "rloo" else GRPOConfig)(
        steps=sizes.rl_steps, prompts_per_step=sizes.prompts_per_step, generations=sizes.generations,
        max_new_tokens=sizes.max_new_tokens, beta=0.05, save_every=10**6, eval_every=10**6, dtype="float32")
    loaded = load_model("bundled", dtype="float32", device="cpu")
    args = trl_config(section, out_dir=tmp / algo, on_gpu=False, dtype=torch.float32, seed=0)
    args.disable_tqdm = True
    per_step = sizes.prompts_per_step * sizes.generations
    scorer = RewardScorer.from_folder(pm_folder, device="cpu", batch_size=per_step)
    gen_s: list[float] = []
    score_s: list[float] = []
    loaded.model.generate = timed(loaded.model.generate, gen_s)  # the instance TRL calls on one CPU process
    reward = pm_reward(scorer)
    timed_reward = timed(reward, score_s)
    timed_reward.__name__ = reward.__name__  # TRL names the reward's metrics after the function
    trainer_class = trl.RLOOTrainer if algo == "rloo" else trl.GRPOTrainer
    trainer = trainer_class(model=loaded.model, reward_funcs=timed_reward, args=args,
                            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
                            processing_class=loaded.tokenizer)
    clock = trainer_clock()
    quiet(trainer, clock).train()
    lengths = [e["completions/mean_length"] for e in trainer.state.log_history if "completions/mean_length" in e]
    samples = trainer.state.global_step * per_step
    rest = clock.seconds - sum(gen_s) - sum(score_s)
    note = (f"{algo.upper()} (TRL) time split: generation {sum(gen_s):.1f} s, PM scoring {sum(score_s):.1f} s, "
            f"log-probs + optimisation + TRL's bookkeeping {rest:.1f} s over {trainer.state.global_step} steps.")
    return samples / clock.seconds, sum(lengths) / max(1, len(lengths)), note


def main() -> None:
    import trl

    from cai.models import load_model

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="a few steps of each, to check the bench runs; writes training.quick.*")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    started = time.perf_counter()
    peak = matmul_peak()
    counts = parameter_counts(load_model("bundled", dtype="float32", device="cpu").model)
    rows = [row("fp32 matmul peak", peak / 1e9, "GFLOP/s", f"2048x2048 matmul, best of 8, {torch.get_num_threads()} threads")]
    notes: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sft_rows, sft_notes = bench_sft(sizes, tmp, peak, counts)
        pm_rows, pm_folder = bench_pm(sizes, tmp)
        dpo_row = bench_dpo(sizes, tmp)
        rl_rows, rl_notes = bench_rl(sizes, tmp, pm_folder)
    rows += sft_rows + pm_rows + [dpo_row] + rl_rows
    notes += sft_notes + rl_notes + [
        "DPO: cai's dpo stage builds TRL's DPOTrainer itself (fp32, no activation checkpointing on CPU, "
        "save_strategy no), so there is no second implementation to compare; the row is its throughput.",
        "The RL reward model is the PM the 'pm cai' row trained; PPO draws its rollout prompts with replacement "
        "from the same 16 red-team prompts RLOO/GRPO take in groups of "
        f"{sizes.generations}. Answers are sampled (temperature 1), so lengths differ: see the check column.",
        "Both sides step with fused AdamW: TRL's default adamw_torch_fused, cai's cai.train.optim.adamw.",
        f"Whole bench took {time.perf_counter() - started:.0f} s" + (" (--quick: not final figures)" if args.quick else ""),
    ]
    workload = (f"bundled SmolLM2-135M-Instruct, fp32 CPU; SFT {sizes.sft_examples} chats batch {sizes.sft_batch}; "
                f"PM {sizes.pm_pairs} pairs batch {sizes.pm_batch}; DPO {sizes.dpo_pairs} pairs; RL "
                f"{sizes.rl_steps} steps x {sizes.prompts_per_step} prompts x {sizes.generations} generations "
                f"<= {sizes.max_new_tokens} tokens; max_length {sizes.max_length}")
    out = result("training", args.quick, workload, rows, notes, trl=trl.__version__)
    write_results(out, stem("training", args.quick))
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
