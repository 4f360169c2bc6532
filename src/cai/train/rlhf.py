"""The RLHF baseline: a preference model trained on human comparisons only, then the same RL as RL-CAI.

A reviewer asks whether RL-CAI beats RLHF on human labels (the paper's helpful-only and
helpful+harmless RLHF rows). This stage answers with only the labels changed:

1. **Comparisons** (`cai.data.comparisons`): ``rlhf.helpful_data``, plus ``rlhf.harmless_data`` for
   the ``helpful-harmless`` variant, as hard-labelled pairs grouped by conversation. They are read,
   every row checked, before any model loads. All of them are used: ``pm.helpfulness_ratio`` and
   ``pm.human_ratio`` mix AI labels with helpfulness data, which has no counterpart here, and the
   paper's RLHF models learned from every comparison they were given.
2. **Preference model** (`cai.train.pm`), trained with ``pm``'s settings into ``rlhf/pm/`` and its
   held-out accuracy measured and described as the pm stage's is. A marker written last
   (``rlhf/pm/finished.json``) lets a rerun after a crash in RL keep it instead of training it again.
3. **RL**: PPO with ``rl.ppo``'s settings against that PM (`cai.train.ppo.train_ppo`, which resumes
   from its own checkpoints), or DPO with ``rl.dpo``'s on the PM's training pairs
   (`cai.train.dpo.train_dpo`), from the base model or the SL-CAI one (``rlhf.policy``). The policy
   is saved at the top of ``rlhf/``, so ``cai eval`` loads and compares it like ``ppo/``.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from rich.console import Console

from cai.config import RLHFConfig, RunConfig
from cai.config_loader import config_to_yaml
from cai.data.comparisons import AXES, rlhf_sources
from cai.errors import CaiError
from cai.eval.verdict import describe_pm
from cai.io import write_json_atomic
from cai.runs import StageRun, policy_spec
from cai.train.dpo import train_dpo
from cai.train.model_folder import write_model_card
from cai.train.pm import Pair, pairs_from_human_comparisons, split_by_group, train_preference_model
from cai.train.ppo import describe_ppo, fit_ppo_prompts, load_ppo_prompts, ppo_summary, train_ppo

console = Console(stderr=True)

PM_FOLDER = "pm"
PM_MARKER = "finished.json"
"""Written in the PM folder after the PM is saved: the fingerprint of its comparisons and its metrics."""
PM_FACTS = ("steps", "train_pairs", "eval_pairs", "eval_accuracy", "eval_accuracy_ci", "eval_accuracy_n",
            "eval_accuracy_before", "eval_accuracy_before_ci", "eval_ece", "eval_ece_ci")
"""The PM metrics copied (with a ``pm_`` prefix) into the stage's manifest and model card."""


def rlhf_pairs(config: RLHFConfig) -> list[Pair]:
    """The variant's comparisons as PM pairs: helpful_data's as helpfulness, harmless_data's as harmlessness.

    Raises:
        CaiError: a source the variant needs is null or unreadable, or one of its rows is malformed.
    """
    return [pair for _, source, axis in rlhf_sources(config) for pair in pairs_from_human_comparisons(source, axis)]


def pairs_digest(pairs: list[Pair]) -> str:
    """A fingerprint of the comparisons, so a PM trained on other data is never taken for this one."""
    data = [[p.prompt, p.response_a, p.response_b, p.p_a, p.kind] for p in pairs]
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode("utf-8")).hexdigest()


def train_or_reuse_pm(pairs: list[Pair], train: list[Pair], held_out: list[Pair], *, folder: Path, cfg: RunConfig,
                      show_progress: bool = True) -> dict[str, Any]:
    """Train the human-label PM into ``folder``, or return the metrics of the one a previous attempt finished.

    Raises:
        CaiError: ``folder`` holds a finished PM trained on other comparisons (a data file changed).
    """
    marker, digest = folder / PM_MARKER, pairs_digest(pairs)
    if marker.is_file():
        finished = json.loads(marker.read_text(encoding="utf-8"))
        if finished.get("pairs_digest") != digest:
            raise CaiError(f"rlhf: the preference model in {folder} was trained on other comparisons (a data file "
                           f"changed since); delete {folder.parent} to redo the stage with the new data")
        console.print(f"rlhf: keeping the preference model already trained in {folder}")
        return finished["metrics"]
    base = cfg.pm.base or cfg.model.name
    metrics = train_preference_model(train, held_out, base=base, out_dir=folder, config=cfg.pm, seed=cfg.seed,
                                     device=cfg.model.device, show_progress=show_progress)
    write_model_card(folder, title=f"Human-label preference model of run '{cfg.name}' (RLHF baseline)", base_model=base,
                     summary=("Scalar-head preference model trained with a Bradley-Terry loss on human comparisons "
                              f"only ({cfg.rlhf.variant}), with the pm stage's settings. Made by cai."),
                     facts=metrics, config_yaml=config_to_yaml(cfg))
    write_json_atomic(marker, {"pairs_digest": digest, "metrics": metrics})
    return metrics


def dpo_row(pair: Pair) -> dict[str, Any]:
    """A human comparison as the label stage's DPO row (TRL conversational format, certain label)."""
    return {"prompt": pair.prompt, "chosen": [{"role": "assistant", "content": pair.response_a}],
            "rejected": [{"role": "assistant", "content": pair.response_b}], "p_a": pair.p_a, "score": 1.0}


def run_rlhf(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``rlhf``: a PM on human comparisons only, then PPO against it (or DPO), into ``rlhf/``."""
    st = StageRun(cfg, "rlhf", shard)
    rcfg = cfg.rlhf
    pairs = rlhf_pairs(rcfg)
    prompts = load_ppo_prompts(cfg.rl.ppo) if rcfg.algo == "ppo" else None
    if st.skip():
        return st.dir
    policy = cfg.model.name if rcfg.policy == "base" else policy_spec(cfg)
    train, held_out = split_by_group(pairs, cfg.pm.eval_fraction, random.Random(f"{cfg.seed}:rlhf-split"))
    counts = {"variant": rcfg.variant, "algo": rcfg.algo, "policy": rcfg.policy,
              **{f"{axis}_pairs": sum(p.kind == axis for p in pairs) for axis in AXES},
              "train_pairs": len(train), "eval_pairs": len(held_out)}
    st.start(model=policy, **counts)
    pm_metrics = train_or_reuse_pm(pairs, train, held_out, folder=st.dir / PM_FOLDER, cfg=cfg,
                                   show_progress=show_progress)
    console.print(f"rlhf pm: {describe_pm(pm_metrics)}")
    pm_facts = {f"pm_{key}": pm_metrics.get(key) for key in PM_FACTS}
    st.update(**pm_facts)
    if rcfg.algo == "ppo":
        metrics = train_ppo(*fit_ppo_prompts(prompts, cfg.rl.ppo, policy), policy_spec=policy,
                            pm_folder=st.dir / PM_FOLDER, out_dir=st.dir, config=cfg.rl.ppo, seed=cfg.seed,
                            device=cfg.model.device, show_progress=show_progress)
        result = ppo_summary(metrics, st.dir)
        line, how = describe_ppo(result), "optimised with PPO against it, with a KL penalty to its starting model"
    else:
        result = train_dpo([dpo_row(p) for p in train], policy_spec=policy, out_dir=st.dir, config=cfg.rl.dpo,
                           seed=cfg.seed, device=cfg.model.device)
        line = f"DPO on {result['pairs']} pairs, loss {result['first_loss']} -> {result['last_loss']}"
        how = "trained with DPO on its training comparisons"
    facts = {**counts, **pm_facts, **result}
    write_model_card(st.dir, title=f"RLHF baseline ({rcfg.variant}, {rcfg.algo}) of run '{cfg.name}'", base_model=policy,
                     summary=(f"A preference model trained on human comparisons only ({rcfg.variant}; no AI feedback), "
                              f"in `{PM_FOLDER}/`; this policy was {how}. `cai eval` compares RL-CAI with it."),
                     facts=facts, config_yaml=config_to_yaml(cfg))
    console.print(f"rlhf: {line}")
    st.done(**facts)
    return st.dir
