"""Adding a baseline to a finished run: earlier stages stay valid, and a finished eval that lacks the new model reopens."""

from __future__ import annotations

from cai.config import RunConfig
from cai.pipeline import prepare_run
from cai.runs import StageRun, read_manifest


def test_naming_a_baseline_later_keeps_the_finished_run(tmp_path):
    cfg = RunConfig(name="r", runs_dir=str(tmp_path))
    prepare_run(cfg)
    prepare_run(cfg.model_copy(update={"baselines": ["distill", "rlhf"]}))  # no "different config" refusal


def test_a_reopened_stage_runs_again_from_its_rows(tmp_path):
    cfg = RunConfig(name="r", runs_dir=str(tmp_path))
    first = StageRun(cfg, "eval")
    first.start(model="base, sft")
    (first.dir / "responses.jsonl").write_text('{"model": "base"}\n')
    first.done(answers=1)
    again = StageRun(cfg, "eval")
    assert again.skip()
    later = StageRun(cfg, "eval")
    later.reopen("the run's models are now base, sft, distill")
    assert not later.skip()
    assert read_manifest(later.dir)["status"] == "running"
    assert (later.dir / "responses.jsonl").read_text() == '{"model": "base"}\n'  # kept for the resume
    later.start(model="base, sft, distill")
    assert read_manifest(later.dir)["attempts"] == 2
    later.release()
