"""The distill baseline: SFT on the critic's own answers under the principles, end to end on the tiny model."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_run_overrides

from cai.backends.fake import FakeBackend
from cai.config import RunConfig
from cai.config_loader import load_config
from cai.constitution_yaml import load_constitution
from cai.data.prompt_sets import load_prompt_set
from cai.errors import CaiError
from cai.io import read_jsonl
from cai.prompts import distill_system
from cai.train import distill

FAST = ["sft.epochs=3", "sft.batch_size=4"]


def _user_turn(rendered: str) -> str:
    """The last user message of a prompt as the fake backend renders it."""
    return rendered.rsplit("<|user|>\n", 1)[1].split("\n<|assistant|>", 1)[0]


class Critic(FakeBackend):
    """A fake critic whose answer names the prompt it answers ("" for the prompts in ``empty``)."""

    def __init__(self, empty: frozenset[str] = frozenset(), fail_after: int | None = None) -> None:
        super().__init__(respond=self._answer)
        self.empty, self.fail_after, self.answered = empty, fail_after, 0

    def _answer(self, rendered: str, seed: int) -> str:
        if self.fail_after is not None and self.answered >= self.fail_after:
            raise KeyboardInterrupt  # the process is killed mid-chunk
        self.answered += 1
        user = _user_turn(rendered)
        return "" if user in self.empty else f"Carefully: {' '.join(user.split()[:5])}"


class Critics(list):
    """Every critic the stage loaded, in order; ``next`` is the one it loads next (a plain `Critic` by default)."""

    next: Critic | None = None


@pytest.fixture()
def critics(monkeypatch) -> Critics:
    loaded = Critics()

    def load(config, **options):  # options: cache_dir, which a fake backend has no use for
        loaded.append(loaded.next or Critic())
        loaded.next = None
        return loaded[-1]

    monkeypatch.setattr(distill, "load_backend", load)
    return loaded


def _cfg(tiny_model_dir, small_constitution, tmp_path, *extra):
    overrides = tiny_run_overrides(tiny_model_dir, tmp_path / "runs", small_constitution)
    cfg = load_config(RunConfig, None, [*overrides, *FAST, *extra])
    _finished_critique(cfg)
    return cfg


def _finished_critique(cfg: RunConfig) -> None:
    """A done critique stage whose helpfulness answers (the policy's own, as SL-CAI mixes them in) distill reuses."""
    from cai.io import JsonlWriter
    from cai.runs import StageRun

    st = StageRun(cfg, "critique")
    st.start(model="m")
    rows = load_prompt_set(cfg.critique.helpfulness, "helpfulness") if cfg.critique.helpfulness else []
    with JsonlWriter(st.dir / "helpfulness.jsonl") as writer:
        for r in rows:
            writer.write({"id": r.id, "messages": [*r.messages, {"role": "assistant", "content": f"My own answer to {r.id}."}]})
    st.done()


def test_distill_trains_on_the_critics_answers_without_the_system_turn(tiny_model_dir, small_constitution, tmp_path,
                                                                       critics):
    cfg = _cfg(tiny_model_dir, small_constitution, tmp_path)
    red_team = load_prompt_set(cfg.critique.prompts, "red-team")
    helpful = load_prompt_set(cfg.critique.helpfulness, "helpfulness")
    dropped = red_team[0].last_user
    critics.next = Critic(empty=frozenset({dropped}))

    out = distill.run_distill(cfg, show_progress=False)

    # One answer per red-team prompt; the helpfulness data is SL-CAI's own (the critique stage's).
    answers = read_jsonl(out / "answers.jsonl")
    assert [r["id"] for r in answers] == [f"red-team/{r.id}" for r in red_team]
    # The critic answered every prompt under the principles, and was closed before training.
    (critic,) = critics
    system = distill_system(load_constitution(str(small_constitution)))
    prompts = [p for method, batch in critic.calls if method == "generate" for p in batch]
    assert len(prompts) == 6 and all(p.startswith(f"<|system|>\n{system}\n<|user|>") for p in prompts)
    assert "Rewrite the response to remove harm." in system and "Rewrite the response to be accurate." in system
    assert critic.closed
    assert (out / "system.txt").read_text().strip() == system.strip()
    # The rows, and the training data, hold the bare conversation: no system turn anywhere.
    assert all(m["role"] != "system" for r in answers for m in r["messages"])
    train = read_jsonl(out / "train_data.jsonl")
    assert train and all(m["role"] != "system" for r in train for m in r["messages"])
    assert all(r["messages"][-1]["role"] == "assistant" for r in train)
    written = {r["messages"][-1]["content"] for r in answers}
    own = {f"My own answer to {r.id}." for r in helpful}
    assert {r["messages"][-1]["content"] for r in train} <= (written - {""}) | own
    assert {r["messages"][-1]["content"] for r in train} & own  # SL-CAI's helpfulness rows are mixed in
    assert all(r["messages"][-2]["content"] != dropped for r in train)  # the empty answer is not trained on

    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["answers"] == 6 and counts["red_team_rows"] == 6 and counts["helpfulness_rows"] == 4
    assert counts["degenerate_answers"] == counts["degenerate_red_team_answers"] == 1
    # SL-CAI's mix: helpfulness is a quarter of the examples (0.25 / 0.75 * 5 red-team answers = 2).
    assert (counts["harmlessness_examples"], counts["helpfulness_examples"], counts["train_rows"]) == (5, 2, 7)
    assert counts["examples"] == 7 and counts["steps"] == 6
    assert counts["mean_loss_last_quarter"] < counts["mean_loss_first_quarter"]  # it learns the answers
    assert (out / "model.safetensors").is_file() and "Distill baseline" in (out / "README.md").read_text()

    # A finished stage is skipped: no critic is loaded again.
    assert distill.run_distill(cfg, show_progress=False) == out
    assert len(critics) == 1


def test_a_rerun_after_a_crash_answers_only_the_prompts_not_written(tiny_model_dir, small_constitution, tmp_path,
                                                                    critics):
    cfg = _cfg(tiny_model_dir, small_constitution, tmp_path, "critique.helpfulness=null")
    critics.next = Critic(fail_after=4)  # chunks are 3 rows: the first is written, the second is not
    with pytest.raises(KeyboardInterrupt):
        distill.run_distill(cfg, show_progress=False)
    path = cfg.run_dir / "distill" / "answers.jsonl"
    first = read_jsonl(path)
    assert len(first) == 3
    with path.open("a") as f:
        f.write('{"id": "red-team/rt-9999", "set": "red-te')  # a row cut off by the kill

    out = distill.run_distill(cfg, show_progress=False)
    rerun = critics[1]
    answered = [_user_turn(p) for method, batch in rerun.calls if method == "generate" for p in batch]
    assert len(answered) == 3 and not {r["prompt"][-1]["content"] for r in first} & set(answered)
    answers = read_jsonl(out / "answers.jsonl")
    assert answers[:3] == first and len({r["id"] for r in answers}) == len(answers) == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["attempts"] == 2 and manifest["counts"]["answers"] == 6


def test_only_degenerate_answers_is_a_clear_error(tiny_model_dir, small_constitution, tmp_path, critics):
    cfg = _cfg(tiny_model_dir, small_constitution, tmp_path, "critique.helpfulness=null")
    critics.next = Critic(empty=frozenset(r.last_user for r in load_prompt_set(cfg.critique.prompts, "x")))
    with pytest.raises(CaiError, match="none of the 6 red-team answers .* is usable"):
        distill.run_distill(cfg, show_progress=False)


def test_cai_run_runs_distill_only_when_baselines_names_it_and_eval_lists_it(
        tiny_model_dir, small_constitution, tmp_path, critics, cai_cli, monkeypatch):
    """`cai run` with the other stages stubbed out: distill runs after the RL stages, only when named."""
    from cai import pipeline
    from cai.eval.evaluate import eval_models
    from cai.runs import stage_status

    real_run_stage = pipeline.run_stage
    ran: list[str] = []

    def run_stage(cfg, name, **kwargs):
        ran.append(name)
        if name == "critique":
            _finished_critique(cfg)
        return real_run_stage(cfg, name, **kwargs) if name == "distill" else cfg.run_dir / name

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    overrides = [*tiny_run_overrides(tiny_model_dir, tmp_path / "runs", small_constitution), *FAST, "rl.algo=dpo"]
    config = tmp_path / "run.yaml"
    config.write_text("")  # every key comes from --set
    sets = [a for o in overrides for a in ("--set", o)]

    result = cai_cli("run", config, *sets, "--set", "name=plain")
    assert result.code == 0, result.err
    assert ran == ["critique", "sft", "sample", "label", "pm", "dpo", "eval"]
    plain = load_config(RunConfig, config, [*overrides, "name=plain"])
    status = {r["stage"]: r["status"] for r in stage_status(plain.run_dir, plain.rl.algo, plain.baselines)}
    assert status["distill"] == "not in this run (baselines)"
    assert not critics

    ran.clear()
    result = cai_cli("run", config, *sets, "--set", "name=with", "--set", "baselines=[distill]")
    assert result.code == 0, result.err
    assert ran == ["critique", "sft", "sample", "label", "pm", "dpo", "distill", "eval"]
    cfg = load_config(RunConfig, config, [*overrides, "name=with", "baselines=[distill]"])
    assert json.loads((cfg.run_dir / "distill" / "manifest.json").read_text())["status"] == "done"
    assert eval_models(cfg) == {"base": str(tiny_model_dir), "distill": str(cfg.run_dir / "distill")}


def test_turning_a_baseline_on_leaves_the_other_stages_config_hashes_alone():
    from cai.runs import STAGES, stage_config_hash

    plain, with_baselines = RunConfig(), RunConfig(baselines=["distill", "rlhf"])
    assert all(stage_config_hash(plain, s.name) == stage_config_hash(with_baselines, s.name) for s in STAGES)


def test_the_distill_command_is_a_baseline_stage(cai_cli):
    result = cai_cli("distill", "--help")
    assert result.code == 0 and "Baseline" in result.out
