"""Adding a baseline to a finished run: earlier stages stay valid, and a finished eval that lacks the new model reopens."""

from __future__ import annotations

from cai.config import RunConfig
from cai.pipeline import prepare_run
from cai.runs import StageRun, read_manifest


def test_naming_a_baseline_later_keeps_the_finished_run(tmp_path):
    cfg = RunConfig(name="r", runs_dir=str(tmp_path))
    prepare_run(cfg)
    prepare_run(cfg.model_copy(update={"baselines": ["distill", "rlhf"]}))  # no "different config" refusal
    assert "- distill" in (cfg.run_dir / "config.yaml").read_text()  # the run now records the baselines it names


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


def test_a_stage_made_before_new_config_keys_existed_resumes(tmp_path):
    """A newer cai adds keys at their defaults: the stage's hash changes, but what it computes does
    not, so a run started before the upgrade is reused; a real change is still refused."""
    import json

    import pytest
    import yaml

    from cai.errors import CaiError

    cfg = RunConfig(name="r", runs_dir=str(tmp_path))
    first = StageRun(cfg, "critique")
    first.start(model="m")
    first.done(rows=1)
    saved = yaml.safe_load((first.dir / "config.yaml").read_text())
    del saved["critique"]["accept"], saved["critique"]["accept_method"]  # as an older cai wrote it
    (first.dir / "config.yaml").write_text(yaml.safe_dump(saved))
    manifest = json.loads((first.dir / "manifest.json").read_text())
    (first.dir / "manifest.json").write_text(json.dumps({**manifest, "config_hash": "older-cai"}))
    assert StageRun(cfg, "critique").skip()
    saved["critique"]["rounds"] = 3  # a real change
    (first.dir / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(CaiError, match="different config.*critique.rounds"):
        StageRun(cfg, "critique")


def test_a_baseline_section_changes_nothing_in_a_run_that_does_not_name_it(tmp_path):
    cfg = RunConfig(name="r", runs_dir=str(tmp_path))
    prepare_run(cfg)
    prepare_run(cfg.model_copy(update={"distill": cfg.distill.model_copy(update={"system": "Be kind."})}))
