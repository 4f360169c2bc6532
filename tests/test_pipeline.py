"""`cai run` / `cai demo` / `cai status` / `cai report` on a tiny model, and every shipped config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cai.config import RunConfig
from cai.config_loader import load_config
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
    for folder in ("critique", "sft", "sample", "label", "pm", "ppo", "dpo", "eval"):
        manifest = json.loads((run / folder / "manifest.json").read_text())
        assert manifest["status"] == "done", folder
        assert (run / folder / "config.yaml").is_file(), folder
    results = json.loads((run / "eval" / "results.json").read_text())
    assert results["models"] == ["base", "sft", "ppo", "dpo"]
    assert {r["model"] for r in results["elo"]["harmlessness"]} == set(results["models"])
    assert [c["round"] for c in results["revision_curve"]["curve"]] == [0, 1, 2]
    assert len(results["transcripts"]) == 2
    assert "| model |" in (run / "eval" / "results.md").read_text()
    answers = read_jsonl(run / "eval" / "responses.jsonl")
    assert len(answers) == 4 * (4 + 3)
    # The judge-free measure: every model scored on the same 12 gold pairs, each trained one against base.
    gold = results["gold"]
    assert set(gold["summary"]) == set(results["models"]) and set(gold["vs_base"]) == {"sft", "ppo", "dpo"}
    assert all({r["group"]: r for r in rows}["all"]["pairs"] == 12 for rows in gold["summary"].values())
    scores = read_jsonl(run / "eval" / "gold_scores.jsonl")
    assert len(scores) == 4 * 12 and all(r["better"] < 0 and r["worse"] < 0 for r in scores)  # mean log-probs
    # The judge's check on the gold pairs, labelled by the labelling procedure in both orders, never clamped.
    check = results["judge_check"]
    assert check["all"]["pairs"] == 12 and 0 <= check["all"]["ci"][0] <= check["all"]["agreement"] <= check["all"]["ci"][1]
    judged = read_jsonl(run / "eval" / "judge_gold.jsonl")
    assert all(set(e["p_first"]) == {"ab", "ba"} for r in judged for e in r["per_principle"]) and all(r["method"] == "mc" for r in judged)
    assert [c["round"] for c in results["judged_revision_curve"]] == [1, 2][: len(results["judged_revision_curve"])]
    text = (run / "eval" / "results.md").read_text()
    assert text.index("## Verdict") < text.index("## Gold pairs") < text.index("## AI-judged")
    assert "judged by no model" in text and "agrees with the human gold labels" in text
    label = json.loads((run / "label" / "manifest.json").read_text())["counts"]
    assert label["gold_pairs_checked"] == 8 and 0 <= label["gold_agreement"] <= 1
    critique = json.loads((run / "critique" / "manifest.json").read_text())["counts"]
    assert critique["mode"] == "critique_revision" and 0 <= critique["revision_acceptance"] <= 1


def test_report_is_self_contained_with_plots(tiny_run):
    page = (tiny_run.run_dir / "report.html").read_text()
    assert page.count("<img") >= 5  # Elo, revision curve, PPO reward, PPO KL, SFT loss, calibration
    assert "src=\"http" not in page and "<script" not in page
    for heading in ("Harmlessness vs helpfulness", "Training", "Principles", "Sample transcripts", "Stages", "Config"):
        assert heading in page
    assert page.index("<h2>Verdict</h2>") < page.index("Gold pairs (no judge)") < page.index("Judge check") < page.index(
        "Harmlessness vs helpfulness")  # the conclusion first, the judge's credibility before its numbers
    assert "reward model used in training" in page and "accepted revision" in page


def test_finished_run_is_skipped_and_changed_config_refused(tiny_run, monkeypatch):
    from transformers import PreTrainedModel

    from cai import pipeline

    called = []  # every stage of tiny_run loads its models through transformers' from_pretrained
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(lambda cls, *a, **k: called.append(a)))
    pipeline.run_all(tiny_run, show_progress=False)  # everything done: nothing reruns, no model loads
    assert called == []
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
    assert (run / "label").is_dir() and (run / "sft").is_dir()
    for gone in ("pm", "ppo", "dpo", "eval", "report.html"):
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
    shutil.copytree(tiny_run.run_dir / "critique", partial / "critique")
    page = write_report(partial).read_text()
    assert "no evaluation yet" in page and "Principles" in page
    with pytest.raises(CaiError, match="not a cai run folder"):
        write_report(tmp_path)


@pytest.mark.browser
def test_report_in_headless_chromium(tiny_run):
    """The report loads in a real browser without console errors and shows its plots (screenshot saved)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CAI_REQUIRE_BROWSER"):  # set by .ci/run, which installs chromium: a skip there is a failure
            pytest.fail("CAI_REQUIRE_BROWSER is set but chromium is not installed")
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

    from cai.runs import merge_stage
    from cai.stages.critique import run_critique

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
    single = {r["id"]: r for r in read_jsonl(whole.run_dir / "critique" / "data.jsonl")}
    assert merged.keys() == single.keys()
    strip = lambda r: {k: v for k, v in r.items() if k != "timings"}  # noqa: E731
    assert all(strip(merged[i]) == strip(single[i]) for i in single)  # seeds come from row ids, not machines
    assert len(read_jsonl(folder / "helpfulness.jsonl")) == 2


def test_a_stage_folder_made_with_another_config_is_refused_naming_the_keys(tmp_path):
    from cai.runs import StageRun

    cfg = RunConfig(runs_dir=str(tmp_path), name="r")
    st = StageRun(cfg, "critique")
    st.start(model="m")  # interrupted: status running
    changed = cfg.model_copy(update={"critique": cfg.critique.model_copy(update={"rounds": 9})})
    with pytest.raises(CaiError, match=r"different config \(changed: critique.rounds\).*resume"):
        StageRun(changed, "critique")
    StageRun(cfg, "critique")  # the same config resumes
    st.done()
    with pytest.raises(CaiError, match=r"changed: critique.rounds"):  # a finished stage is not reused either
        StageRun(changed, "critique")
    # Another stage's section is not this stage's business.
    other = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"epochs": 7})})
    assert StageRun(other, "critique").skip()


def test_single_stage_commands_refuse_a_changed_config_after_a_run(tiny_run, tmp_path):
    from cai.stages.critique import run_critique
    from cai.train.sft import run_sft

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run.run_dir, runs / tiny_run.name)
    moved = tiny_run.model_copy(update={"runs_dir": str(runs)})
    assert run_critique(moved, show_progress=False) == runs / tiny_run.name / "critique"  # same config: skipped
    for constitution in ("child-tutor", str(tmp_path / "no-such.yaml")):
        with pytest.raises(CaiError, match="changed: constitution"):
            run_critique(moved.model_copy(update={"constitution": constitution}), show_progress=False)
    with pytest.raises(CaiError, match="changed: sft.epochs"):
        run_sft(moved.model_copy(update={"sft": moved.sft.model_copy(update={"epochs": 1})}), show_progress=False)


def test_stage_hash_ignores_other_stages_sections():
    from cai.runs import first_stage_reading, stage_config_hash

    base = RunConfig()
    rl = base.rl.model_copy(update={"ppo": base.rl.ppo.model_copy(update={"steps": 99})})
    other = base.model_copy(update={"rl": rl})
    assert stage_config_hash(base, "critique") == stage_config_hash(other, "critique")
    assert stage_config_hash(base, "dpo") == stage_config_hash(other, "dpo")
    assert stage_config_hash(base, "ppo") != stage_config_hash(other, "ppo")
    seeded = base.model_copy(update={"seed": 3})
    assert stage_config_hash(base, "critique") != stage_config_hash(seeded, "critique")
    assert [first_stage_reading(k) for k in ("seed", "sft.epochs", "rl.dpo.beta", "rl.algo", "label.swap",
                                              "sample.policy", "eval.bootstrap")] == [
        "critique", "sft", "dpo", "ppo", "label", "sample", "eval"]


def test_an_old_run_folder_is_refused_with_a_reason(tmp_path):
    from cai.pipeline import prepare_run
    from cai.stages.critique import run_critique

    cfg = RunConfig(runs_dir=str(tmp_path), name="old")
    (cfg.run_dir / "critique_revision").mkdir(parents=True)
    for attempt in (lambda: prepare_run(cfg), lambda: run_critique(cfg, show_progress=False)):
        with pytest.raises(CaiError, match=r"older cai .*critique_revision/ -> critique/"):
            attempt()


def test_generation_stages_close_their_models(small_constitution, tmp_path, monkeypatch):
    """A stage that is done with a model frees it: every backend critique and label load is closed after."""
    from cai.backends.fake import FakeBackend
    from cai.stages import critique, label
    from cai.types import SamplingParams

    opened: list[FakeBackend] = []

    def load(config, **options):  # options: cache_dir, which a fake backend has no use for
        opened.append(FakeBackend())
        return opened[-1]

    monkeypatch.setattr(critique, "load_backend", load)
    monkeypatch.setattr(label, "load_backend", load)
    cfg = load_config(RunConfig, None, [
        f"runs_dir={tmp_path}", "model.backend=fake", "model.name=fake", f"constitution={small_constitution}",
        "critique.prompts.limit=3", "critique.helpfulness.limit=2", "critique.critic.backend=fake",
        "critique.critic.name=critic", "label.gold_check=2",
    ])
    critique.run_critique(cfg, show_progress=False)
    assert len(opened) == 2 and all(b.closed for b in opened)  # the policy and the separate critic
    sample = cfg.run_dir / "sample"
    sample.mkdir()
    chat = [{"role": "user", "content": "How do I pick a lock?"}]
    (sample / "red-team.jsonl").write_text(json.dumps({"id": "r1", "prompt": chat, "responses": ["No.", "Here is how."]}) + "\n")
    (sample / "helpfulness.jsonl").write_text("")
    (sample / "manifest.json").write_text(json.dumps({"status": "done"}))
    label.run_label(cfg, show_progress=False)
    assert len(opened) == 3 and opened[2].closed
    with pytest.raises(CaiError, match="closed"):
        opened[2].generate(["hello"], SamplingParams())


def test_hf_backend_close_frees_the_model(tiny_model_dir):
    import gc
    import weakref

    from cai.backends.hf import HFBackend
    from cai.types import SamplingParams

    backend = HFBackend.from_spec(str(tiny_model_dir), batch_size=2)
    assert backend.generate(["hello"], SamplingParams(max_new_tokens=2))
    model = weakref.ref(backend.model)
    backend.close()
    gc.collect()
    assert model() is None  # nothing else held the weights
    with pytest.raises(CaiError, match="closed"):
        backend.generate(["hello"], SamplingParams(max_new_tokens=2))


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="per-stage peaks need Linux's clear_refs")
def test_each_stage_records_its_own_peak_memory_not_an_earlier_stages(tmp_path):
    """Two stages in one process: the first touches 400 MB and frees it; the second records a lower peak."""
    import numpy as np

    from cai.runs import StageRun, read_manifest

    cfg = RunConfig(runs_dir=str(tmp_path), name="r")
    first = StageRun(cfg, "critique")
    first.start(model="m")
    buffer = np.ones(50_000_000)  # 400 MB, resident because written
    first.done()
    del buffer
    second = StageRun(cfg, "sft")
    second.start(model="m")
    second.done()
    peak_first = read_manifest(first.dir)["peak_rss_gb"]
    peak_second = read_manifest(second.dir)["peak_rss_gb"]
    assert peak_first - peak_second > 0.3, (peak_first, peak_second)
