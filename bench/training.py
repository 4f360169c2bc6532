"""Benchmark: training throughput of SFT, the preference model and one PPO iteration, with
model-FLOPs utilisation (MFU) against a matmul peak measured on the same machine in the same run.

Model FLOPs: 6 x parameters x tokens for a training step (forward + backward), 2 x parameters x
tokens for a forward pass. PPO's iteration is split into generation / scoring (PM, old-policy and
reference forwards) / optimisation time. Figures go to bench/results/training.{json,md}.

    python bench/training.py             # ~5 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from cai.config import PMConfig, PPOConfig, SamplingConfig, SFTConfig
from cai.data import load_prompts
from cai.io import read_jsonl
from cai.models import load_model

RESULTS = Path(__file__).parent / "results"


def matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """Best fp32 GFLOP/s of a square matmul on this machine."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
    return best


def chats(n: int) -> list:
    rows, _ = load_prompts("helpfulness", limit=n)
    answer = "Here is a clear, careful answer that explains the main idea and gives one practical example."
    return [[*r.messages, {"role": "assistant", "content": answer}] for r in rows]


def main() -> None:
    from cai.train.pm import Pair, RewardScorer, train_preference_model
    from cai.train.ppo import train_ppo
    from cai.train.sft import train_sft

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--examples", type=int, default=24)
    args = parser.parse_args()

    peak = matmul_peak()
    params = sum(p.numel() for p in load_model(args.model).model.parameters())
    results: dict = {"benchmark": "training", "model": args.model, "parameters": params,
                     "matmul_peak_gflops": round(peak, 1), "torch_threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # SFT -----------------------------------------------------------------------
        metrics = train_sft(chats(args.examples), model_spec=args.model, out_dir=tmp / "sft",
                            config=SFTConfig(epochs=1, batch_size=4, max_length=256), device="cpu", show_progress=False)
        tps = metrics["tokens"] / metrics["seconds"]
        results["sft"] = {"tokens": metrics["tokens"], "seconds": metrics["seconds"], "tokens_per_s": round(tps, 1),
                          "mfu": round(6 * params * tps / (peak * 1e9), 3)}
        # Preference model ------------------------------------------------------------
        base = chats(args.examples)
        pairs = [Pair(c[:-1], c[-1]["content"], "No.", 1.0, str(i)) for i, c in enumerate(base)]
        start = time.perf_counter()
        train_preference_model(pairs, [], base=args.model, out_dir=tmp / "pm",
                               config=PMConfig(epochs=1, batch_size=4, max_length=256), show_progress=False)
        pm_s = time.perf_counter() - start
        scorer = RewardScorer.from_folder(tmp / "pm")
        pm_tokens = sum(len(r) for r in scorer.encode([p.prompt for p in pairs] * 2,
                                                      [p.response_a for p in pairs] + [p.response_b for p in pairs]))
        results["preference_model"] = {"tokens": pm_tokens, "seconds": round(pm_s, 2),
                                       "tokens_per_s": round(pm_tokens / pm_s, 1),
                                       "mfu": round(6 * params * pm_tokens / pm_s / (peak * 1e9), 3),
                                       "note": "seconds include the held-out evaluation passes and saving"}
        # One PPO iteration -------------------------------------------------------------
        prompts, _ = load_prompts("red-team", limit=8)
        config = PPOConfig(steps=1, rollout_batch=8, epochs=1, minibatch=4, eval_every=1000, save_every=1000,
                          sampling=SamplingConfig(max_new_tokens=48, temperature=1.0))
        train_ppo(prompts, [], [], policy_spec=args.model, pm_folder=tmp / "pm", out_dir=tmp / "ppo", config=config,
                  device="cpu", show_progress=False)
        step = [r for r in read_jsonl(tmp / "ppo" / "train_log.jsonl") if "kl" in r][0]
        tokens = step["response_length"] * config.rollout_batch
        results["ppo_iteration"] = {"rollout_batch": config.rollout_batch, "response_tokens": tokens,
                                    "generation_s": step["gen_s"], "scoring_s": step["score_s"],
                                    "optimisation_s": step["opt_s"],
                                    "generated_tokens_per_s": round(tokens / step["gen_s"], 1)}
    results["date"] = time.strftime("%Y-%m-%d")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps(results, indent=2) + "\n")
    s, pm, ppo = results["sft"], results["preference_model"], results["ppo_iteration"]
    (RESULTS / "training.md").write_text(
        f"matmul peak {results['matmul_peak_gflops']} GFLOP/s (fp32, {results['torch_threads']} threads), "
        f"{params / 1e6:.0f}M parameters\n\n"
        "| stage | tokens/s | MFU | time split |\n|---|---|---|---|\n"
        f"| SFT | {s['tokens_per_s']} | {s['mfu']:.0%} | |\n"
        f"| preference model | {pm['tokens_per_s']} | {pm['mfu']:.0%} | includes eval passes |\n"
        f"| PPO iteration ({ppo['rollout_batch']} rollouts) | {ppo['generated_tokens_per_s']} generated | | "
        f"generation {ppo['generation_s']} s / scoring {ppo['scoring_s']} s / optimisation {ppo['optimisation_s']} s |\n"
    )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
