"""The distill baseline: SFT on the critic's own careful answers, with no critique and no revision.

A reviewer's first question about SL-CAI is whether the critique-and-revise loop adds anything over
simply asking a strong model to answer carefully and fine-tuning on what it says (Sharma et al.,
2024). This stage is that alternative, run on the same footing as SL-CAI:

- the same red-team prompts (``critique.prompts``), answered once each by the critic (``critique.critic``,
  else ``model``) under a system turn holding the constitution's principles (``distill.system``; by
  default the critique principles' revision requests, listed by `cai.prompts.distill_system`);
- the same helpfulness data: the critique stage's own ``helpfulness.jsonl`` (the model's answers
  that SL-CAI mixes in), so that only the harmlessness data differs between the two rows;
- the same training: mixed at ``sft.helpfulness_ratio`` and trained by `cai.train.sft.train_sft`
  with the ``sft`` settings.

The training examples hold the user's bare conversation, never the system turn: the model is
meant to learn to answer carefully unprompted, which is what SL-CAI's revisions teach too.
Answers too short or looping to learn from (`cai.stages.critique.is_degenerate`) are dropped and
counted in the manifest. Answers are written to ``answers.jsonl`` a chunk at a time with ids
``<set>/<prompt id>``, so a rerun after a crash skips the rows already written.

    cai distill -c configs/demo.yaml --set 'baselines=[distill]'
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from rich.console import Console

from cai import prompts as P
from cai.backends import load_backend
from cai.config import PromptSetConfig, RunConfig
from cai.config_loader import config_to_yaml
from cai.constitution_yaml import load_constitution
from cai.data import PromptRow
from cai.data.prompt_sets import fit_prompt_set, load_prompt_set
from cai.errors import CaiError
from cai.io import read_jsonl, write_text_atomic
from cai.runs import StageRun
from cai.stages.critique import is_degenerate
from cai.stages.sample import sample_responses
from cai.train.model_folder import write_model_card
from cai.train.sft import mix_with_helpfulness, read_sft_file, train_sft, write_train_data
from cai.types import Chat

console = Console(stderr=True)
RED_TEAM = "red-team"
HELPFULNESS = "helpfulness"


def answer_id(set_name: str, prompt_id: str) -> str:
    """The id of one answer in ``answers.jsonl``: the two prompt sets may reuse each other's ids."""
    return f"{set_name}/{prompt_id}"


def split_answers(rows: list[dict[str, Any]]) -> tuple[dict[str, list[Chat]], dict[str, int]]:
    """The usable answer chats of each set, and how many answers of each set were degenerate.

    Args:
        rows: ``answers.jsonl`` rows (``set``, ``messages`` = the bare conversation + the answer).

    Returns:
        ({set: chats}, {set: degenerate count}) for the red-team and helpfulness sets.
    """
    usable: dict[str, list[Chat]] = {RED_TEAM: [], HELPFULNESS: []}
    degenerate = {RED_TEAM: 0, HELPFULNESS: 0}
    for row in rows:
        if is_degenerate(row["messages"][-1]["content"]):
            degenerate[row["set"]] += 1
        else:
            usable[row["set"]].append(row["messages"])
    return usable, degenerate


def run_distill(cfg: RunConfig, *, shard: str | None = None, show_progress: bool = True) -> Path:
    """Stage ``distill`` (a baseline): the critic answers under the principles, the model is fine-tuned on it.

    Args:
        cfg: the run's `RunConfig`.
        shard: accepted for the stage interface; the stage is not shardable, so any value is refused.

    Returns:
        The stage folder: an HF model folder, ``answers.jsonl``, ``train_data.jsonl``, ``system.txt``.

    Raises:
        CaiError: no usable answer was left to train on, or the inputs are wrong (named by key).
    """
    st = StageRun(cfg, "distill", shard)
    ccfg = cfg.critique
    constitution = load_constitution(cfg.constitution)
    system = cfg.distill.system or P.distill_system(constitution)
    extra = read_sft_file(cfg.sft.extra_data) if cfg.sft.extra_data else []
    sets: list[tuple[str, PromptSetConfig, list[PromptRow]]] = [
        (RED_TEAM, ccfg.prompts, load_prompt_set(ccfg.prompts, "red-team prompts"))]
    critique = st.require("critique")  # its helpfulness answers are SL-CAI's, and so are distill's
    if st.skip():
        return st.dir
    critic_config = ccfg.critic or cfg.model
    st.start(model=cfg.model.name, critic=critic_config.name)
    write_text_atomic(st.dir / "system.txt", system + "\n")
    answers_path = st.dir / "answers.jsonl"
    sampling = cfg.distill.response or ccfg.response
    critic = load_backend(critic_config)
    try:  # the critic is closed before training, so the model being trained never loads beside it
        prompts = 0
        for set_name, source, rows in sets:
            rows = fit_prompt_set(rows, critic, sampling.max_new_tokens, source.too_long, f"{set_name} prompts",
                                  build=lambda chat: P.with_system_turn(chat, system))
            prompts += len(rows)
            sample_responses([replace(r, id=answer_id(set_name, r.id)) for r in rows], backend=critic,
                             params=sampling.params(), out_path=answers_path, seed=cfg.seed,
                             chunk_size=ccfg.chunk_size, clean=P.clean_output, show_progress=show_progress,
                             description=f"distill: {set_name} answers", set_name=set_name, system=system)
            st.update(prompts=prompts, answers=len(read_jsonl(answers_path)))
    finally:
        critic.close()

    answers = read_jsonl(answers_path)
    usable, degenerate = split_answers(answers)
    helpful = [r["messages"] for r in read_jsonl(critique / "helpfulness.jsonl")]
    examples, mix = mix_with_helpfulness(usable[RED_TEAM], helpful + extra,
                                         helpfulness_ratio=cfg.sft.helpfulness_ratio, seed=cfg.seed)
    if not mix["harmlessness_examples"]:
        raise CaiError(f"none of the {sum(r['set'] == RED_TEAM for r in answers)} red-team answers in {answers_path} "
                       "is usable (all empty or degenerate); try a stronger critique.critic or a longer "
                       "distill.response.max_new_tokens")
    counts = {
        "answers": len(answers),
        "red_team_rows": sum(r["set"] == RED_TEAM for r in answers),
        "helpfulness_rows": len(helpful),
        "degenerate_answers": sum(degenerate.values()),
        "degenerate_red_team_answers": degenerate[RED_TEAM],
        "degenerate_helpfulness_answers": degenerate[HELPFULNESS],
        **mix,
        "train_rows": len(examples),
    }
    st.update(**counts)
    if counts["degenerate_answers"]:
        console.print(f"distill: {counts['degenerate_answers']} of {len(answers)} answers were empty or degenerate "
                      "and are left out of training (manifest counts degenerate_*)")
    write_train_data(st.dir / "train_data.jsonl", examples)
    metrics = train_sft(examples, model_spec=cfg.model.name, out_dir=st.dir, config=cfg.sft, seed=cfg.seed,
                        device=cfg.model.device, trust_remote_code=cfg.model.trust_remote_code,
                        show_progress=show_progress, stage="distill")
    write_model_card(
        st.dir, title=f"Distill baseline of run '{cfg.name}'", base_model=cfg.model.name,
        summary=(f"Baseline for SL-CAI: `{cfg.model.name}` fine-tuned on `{critic_config.name}`'s own answers to the "
                 f"same red-team prompts, written under a system turn holding the `{cfg.constitution}` constitution's "
                 "principles, with no critique or revision (the training examples leave the system turn out), mixed "
                 "with SL-CAI's own helpfulness data. Same SFT settings as SL-CAI. Made by cai."),
        facts={"constitution": cfg.constitution, "critic": critic_config.name, **counts,
               **{k: v for k, v in metrics.items() if v is not None}},
        config_yaml=config_to_yaml(cfg),
    )
    st.done(**counts, **metrics)
    return st.dir
