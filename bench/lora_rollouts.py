"""Benchmark: PPO's rollouts from a LoRA policy, adapters folded into the weights against peft's own forward.

PPO with LoRA (``rl.ppo.lora``, as the demo runs it) samples its rollouts with each adapter folded
into a temporary copy of its layer's weight (`cai.train.lora.adapters_folded`): a decode step then
runs one product per adapted layer instead of peft's three. The baseline is what a peft user gets
by default and what cai did before: the same `HFBackend.generate_tokens` call on the same
``PeftModel`` with its adapters applied unfolded. Both sides sample the same prompts with the same
seeds and settings, alternating round by round, and the folded side's time includes folding the
weights and putting them back, once per batch, as PPO pays it once per step.

The policy is the bundled model in float32 with the demo's adapters (rank 16, alpha 32, every
linear layer); the adapters' B matrices are drawn at random (seeded), since a fresh adapter's B is
zero and would make the fold a no-op. The check column compares the outputs: greedy answers should
be identical; sampled rows can differ where a draw lands among the many tokens of tiny probability
(folding changes the logits by float rounding only), so it says how many matched. Tokens/s count
the tokens each side generated. Figures go to bench/results/lora_rollouts.{json,md}.

    HF_HUB_OFFLINE=1 python bench/lora_rollouts.py            # ~2 minutes on 2 CPU cores
    HF_HUB_OFFLINE=1 python bench/lora_rollouts.py --quick    # writes lora_rollouts.quick.{json,md}
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import nullcontext
from typing import Any, Callable

import common
import torch

FULL = {"prompts": 16, "rounds": 2, "max_new_tokens": 40}
QUICK = {"prompts": 4, "rounds": 1, "max_new_tokens": 8}
BATCHES = (4, 16)
"""Rows per rollout batch: the demo's ``rl.ppo.rollout_batch`` (4), and a larger one."""


def adapted_policy(model_spec: str) -> tuple[Any, Any]:
    """The model in float32 with the demo's LoRA adapters, B drawn at random so the adapters change the outputs."""
    from cai.config import LoraConfig
    from cai.models import load_model
    from cai.train.lora import apply_lora

    loaded = load_model(model_spec, dtype="float32", device="cpu")
    model = apply_lora(loaded.model, LoraConfig(enabled=True, r=16, alpha=32, dropout=0.05)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 2e-3)
    return model, loaded.tokenizer


def timed(run: Callable[[], list]) -> tuple[float, list]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bundled")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check the bench runs; writes lora_rollouts.quick.*")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    common.set_threads(args.threads)

    from cai.backends.hf import HFBackend
    from cai.data import load_prompts
    from cai.train.lora import adapters_folded
    from cai.types import SamplingParams

    started = time.perf_counter()
    model, tokenizer = adapted_policy(args.model)
    adapted = sum(m.get_base_layer().weight.numel() for m in model.modules() if hasattr(m, "lora_A") and m.lora_A)
    prompts = [r.messages for r in load_prompts("red-team", limit=sizes["prompts"])[0]]
    sampled = SamplingParams(max_new_tokens=sizes["max_new_tokens"], temperature=1.0)
    greedy = SamplingParams(max_new_tokens=sizes["max_new_tokens"])
    sides = {"folded": lambda: adapters_folded(model), "unfolded": nullcontext}

    def rollouts(side: str, backend: Any, params: SamplingParams, batch: int) -> list:
        out = []
        for start in range(0, len(prompts), batch):  # one batch per PPO step: the fold is paid per batch
            chunk = prompts[start:start + batch]
            with sides[side]():
                out += backend.generate_tokens(chunk, params, seeds=[1000 + start + i for i in range(len(chunk))])
        return out

    rows, notes = [], []
    for batch in BATCHES:
        backend = HFBackend(model, tokenizer, batch_size=batch, reuse_prefix=False)
        for side in sides:  # warm: first-call set-up paid outside the timing
            rollouts(side, backend, SamplingParams(max_new_tokens=2), batch)
        seconds = {side: 0.0 for side in sides}
        tokens = {side: 0 for side in sides}
        outputs: dict[str, list] = {}
        for r in range(sizes["rounds"]):
            for side in (sides if r % 2 == 0 else reversed(list(sides))):  # alternate who goes first
                s, gens = timed(lambda: rollouts(side, backend, sampled, batch))
                seconds[side] += s
                tokens[side] += sum(len(g.token_ids) for g in gens)
                outputs[side] = [list(g.token_ids) for g in gens]
        same_sampled = common.same_count(outputs["folded"], outputs["unfolded"])
        greedy_out = {side: [list(g.token_ids) for g in rollouts(side, backend, greedy, batch)] for side in sides}
        same_greedy = common.same_count(greedy_out["folded"], greedy_out["unfolded"])
        rate = {side: tokens[side] / seconds[side] for side in sides}
        base = f"PPO rollouts, LoRA unfolded (peft), batch {batch} tokens/s"
        rows += [
            common.row(f"PPO rollouts, LoRA folded, batch {batch} tokens/s", rate["folded"], "tokens/s",
                       f"greedy answers identical {same_greedy}; sampled rows identical {same_sampled}; "
                       f"{tokens['folded']} tokens in {seconds['folded']:.1f} s",
                       ratio_vs={base: rate["folded"] / rate["unfolded"]}),
            common.row(base, rate["unfolded"], "tokens/s",
                       f"{tokens['unfolded']} tokens in {seconds['unfolded']:.1f} s"),
        ]
    notes += [
        f"{sizes['prompts']} red-team prompts, <= {sizes['max_new_tokens']} new tokens at temperature 1, "
        f"{sizes['rounds']} rounds per side, alternating; each row's seed fixed, so both sides draw the same uniforms.",
        f"The fold holds a second copy of the {adapted / 1e6:.0f}M adapted weights ({adapted * 4 / 2**20:.0f} MiB "
        "in float32) while a batch samples; the original tensors are put back untouched.",
        f"Whole bench took {time.perf_counter() - started:.0f} s" + (" (--quick: not final figures)" if args.quick else ""),
    ]
    workload = (f"{args.model}, fp32 CPU, LoRA r 16 on every linear layer: PPO-style sampled rollouts of "
                f"{sizes['prompts']} red-team prompts, batches of {' and '.join(map(str, BATCHES))}")
    out = common.result("lora_rollouts", args.quick, workload, rows, notes, peft=_peft_version())
    common.write_results(out, common.stem("lora_rollouts", args.quick))
    print(json.dumps(out, indent=2))


def _peft_version() -> str:
    import peft

    return peft.__version__


if __name__ == "__main__":
    main()
