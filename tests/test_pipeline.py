"""`cai run` / `cai demo` / `cai status` / `cai report` on a tiny model, and every shipped config."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai.config import RunConfig, load_config
from cai.errors import CaiError
from cai.io import read_jsonl

CONFIGS = Path(__file__).parents[1] / "src" / "cai" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_run_config_loads(path):
    cfg = load_config(RunConfig, path)
    assert cfg.name and cfg.model.name
    assert path.read_text().startswith("#")  # each starts with how to run it


@pytest.mark.parametrize("path", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_parses(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert data["num_processes"] >= data["num_machines"] >= 1


def test_repo_configs_folder_is_the_shipped_one():
    root = Path(__file__).parents[1] / "configs"
    assert (root / "demo.yaml").read_text() == (CONFIGS / "demo.yaml").read_text()


def test_whole_run_artifacts(tiny_run):
    run = tiny_run.run_dir
    for folder in ("critique_revision", "sl_cai", "samples", "feedback", "preference_model", "rl_cai", "rl_cai_dpo", "eval"):
        manifest = json.loads((run / folder / "manifest.json").read_text())
        assert manifest["status"] == "done", folder
        assert (run / folder / "config.yaml").is_file(), folder
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["models"] == ["base", "sl_cai", "rl_cai_ppo", "rl_cai_dpo"]
    assert {r["model"] for r in results["elo"]["harmlessness"]} == set(results["models"])
    assert [c["round"] for c in results["revision_curve"]["curve"]] == [0, 1, 2]
    assert len(results["transcripts"]) == 2
    assert "| model |" in (run / "eval" / "results.md").read_text()
    answers = read_jsonl(run / "eval" / "responses.jsonl")
    assert len(answers) == 4 * (4 + 3)


def test_report_is_self_contained_with_plots(tiny_run):
    page = (tiny_run.run_dir / "report.html").read_text()
    assert page.count("<img") >= 5  # Elo, revision curve, PPO reward, PPO KL, SFT loss, calibration
    assert "src=\"http" not in page and "<script" not in page
    for heading in ("Harmlessness vs helpfulness", "Training", "Principles", "Sample transcripts", "Stages", "Config"):
        assert heading in page


def test_finished_run_is_skipped_and_changed_config_refused(tiny_run, monkeypatch):
    from cai import pipeline

    called = []
    monkeypatch.setattr(pipeline, "load_backend", lambda *a, **k: called.append(a), raising=False)
    pipeline.run_all(tiny_run, show_progress=False)  # everything done: nothing reruns
    changed = tiny_run.model_copy(update={"seed": 1})
    with pytest.raises(CaiError, match="different config.*changed: seed"):
        pipeline.run_all(changed, show_progress=False)


def test_rerun_from_a_stage_deletes_it_and_later_stages(tiny_run, tmp_path):
    from cai.pipeline import prepare_run

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run.run_dir, runs / tiny_run.name)
    too_early = tiny_run.model_copy(update={"runs_dir": str(runs), "seed": 5})
    with pytest.raises(CaiError, match="affects the critique stage.*use --from critique"):
        prepare_run(too_early, from_stage="pm")  # the seed changes every stage's data
    pm = tiny_run.pm.model_copy(update={"epochs": 5})
    cfg = tiny_run.model_copy(update={"runs_dir": str(runs), "pm": pm})
    prepare_run(cfg, from_stage="pm")
    run = cfg.run_dir
    assert (run / "feedback").is_dir() and (run / "sl_cai").is_dir()
    for gone in ("preference_model", "rl_cai", "rl_cai_dpo", "eval", "report.html"):
        assert not (run / gone).exists(), gone
    assert "epochs: 5" in (run / "config.yaml").read_text()
    with pytest.raises(CaiError, match="unknown stage 'nope'"):
        prepare_run(cfg, from_stage="nope")


def test_status_and_report_commands(tiny_run, tmp_path):
    result = subprocess.run([sys.executable, "-m", "cai.cli", "status", str(tiny_run.run_dir)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0
    for stage in ("critique", "sft", "sample", "label", "pm", "ppo", "dpo", "eval"):
        assert stage in result.stdout
    assert result.stdout.count("done") >= 8
    copy = tmp_path / "copy"
    shutil.copytree(tiny_run.run_dir, copy)
    (copy / "report.html").unlink()
    result = subprocess.run([sys.executable, "-m", "cai.cli", "report", str(copy)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and (copy / "report.html").is_file()


def test_report_on_a_partial_run(tiny_run, tmp_path):
    from cai.report.html import write_report

    partial = tmp_path / "partial"
    (partial).mkdir()
    shutil.copytree(tiny_run.run_dir / "critique_revision", partial / "critique_revision")
    page = write_report(partial).read_text()
    assert "no evaluation yet" in page and "Principles" in page
    with pytest.raises(CaiError, match="not a cai run folder"):
        write_report(tmp_path)


@pytest.mark.browser
def test_report_in_headless_chromium(tiny_run):
    """The report loads in a real browser without console errors and shows its plots (screenshot saved)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    report = tiny_run.run_dir / "report.html"
    shot = tiny_run.run_dir / "report.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tiny_run.run_dir / '.chromium'}", "--enable-logging=stderr", "--v=0"]
    result = subprocess.run([chromium, *flags, "--window-size=1200,2400", f"--screenshot={shot}", report.as_uri()],
                            capture_output=True, text=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000, result.stderr[-2000:]
    console = [line for line in result.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    dom = subprocess.run([chromium, *flags, "--dump-dom", report.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.stdout.count("<img") >= 5
    import matplotlib.image as mpimg

    pixels = mpimg.imread(shot)
    assert (pixels[..., :3] < 0.9).mean() > 0.02  # plots and text drawn, not a blank page


def test_sharded_critique_merges_to_the_unsharded_rows(tiny_model_dir, small_constitution, tmp_path):
    """Two machines each run half the prompts (`--shard i/2`); `cai merge` gives the same rows as one machine."""
    from conftest import tiny_run_overrides

    from cai.pipeline import merge_stage, run_critique

    overrides = tiny_run_overrides(tiny_model_dir, tmp_path / "runs", small_constitution) + ["critique.helpfulness.limit=2"]
    sharded = load_config(RunConfig, None, overrides)
    whole = load_config(RunConfig, None, [*overrides, "name=whole"])
    for i in range(2):
        run_critique(sharded, shard=f"{i}/2", show_progress=False)
    with pytest.raises(CaiError, match="not finished"):
        merge_stage(sharded, "critique", 3)
    folder = merge_stage(sharded, "critique", 2)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["counts"]["merged_shards"] == 2
    run_critique(whole, show_progress=False)
    merged = {r["id"]: r for r in read_jsonl(folder / "data.jsonl")}
    single = {r["id"]: r for r in read_jsonl(whole.run_dir / "critique_revision" / "data.jsonl")}
    assert merged.keys() == single.keys()
    strip = lambda r: {k: v for k, v in r.items() if k != "timings"}  # noqa: E731
    assert all(strip(merged[i]) == strip(single[i]) for i in single)  # seeds come from row ids, not machines
    assert len(read_jsonl(folder / "helpfulness.jsonl")) == 2


def test_resuming_a_stage_with_a_different_config_is_refused(tmp_path):
    from cai.runs import StageRecord

    StageRecord(tmp_path / "stage", "critique", config_yaml="a: 1\n", config_hash="aaaa", model="m", seed=0)
    with pytest.raises(CaiError, match="started with a different critique config"):
        StageRecord(tmp_path / "stage", "critique", config_yaml="a: 2\n", config_hash="bbbb", model="m", seed=0)
    StageRecord(tmp_path / "stage", "critique", config_yaml="a: 1\n", config_hash="aaaa", model="m", seed=0)


def test_stage_hash_ignores_other_stages_sections():
    from cai.runs import stage_config_hash

    base = RunConfig()
    other = base.model_copy(update={"rl": base.rl.model_copy(update={"steps": 99})})
    assert stage_config_hash(base, "critique") == stage_config_hash(other, "critique")
    assert stage_config_hash(base, "ppo") != stage_config_hash(other, "ppo")
    seeded = base.model_copy(update={"seed": 3})
    assert stage_config_hash(base, "critique") != stage_config_hash(seeded, "critique")
