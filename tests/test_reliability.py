"""Reliability: every user mistake is one `error:` line, kills lose no work, secrets never hit disk.

Bad inputs go through the real CLI entry point in-process (the `cai_cli` fixture). Their configs name an
empty folder as the model: loading it would fail with an error naming it, so an error about the
input itself proves the input was checked before any model load.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import PIPELINE_OVERRIDES, SMALL_CONSTITUTION, tiny_run_overrides

from cai.io import read_jsonl

NO_MODEL = "model-that-must-not-load"
"""An empty folder named as the model: every check passes it, and loading it would fail naming it."""


def error_line(code: int, err: str, *needles: str, exit_code: int = 1) -> str:
    """Check the exit code, that stderr has exactly one `error:` line and no traceback; return that line."""
    assert code == exit_code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def sets(*overrides: str) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def stage_args(command: str, tmp: Path, constitution: Path, *extra: str) -> list[str]:
    """`cai COMMAND` on a fresh runs folder, with a model that would fail if anything loaded it."""
    base = [f"runs_dir={tmp / 'runs'}", "name=r", f"model.name={tmp / NO_MODEL}", f"constitution={constitution}",
            "critique.helpfulness=null"]
    return [command, *sets(*base, *extra)]


def _write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


# Each case: (tmp, constitution) -> (argv, words the error line must contain).
def _config_case(text: str | bytes, *needles: str):
    def build(tmp, const):
        cfg = _write(tmp / "run.yaml", text)
        return ["critique", "-c", cfg, *sets(f"model.name={tmp / NO_MODEL}")], [str(cfg), *needles]
    return build


def _constitution_case(text: str | bytes, *needles: str):
    def build(tmp, const):
        bad = _write(tmp / "bad_constitution.yaml", text)
        return stage_args("critique", tmp, const, f"constitution={bad}"), ["bad_constitution.yaml", *needles]
    return build


def _prompt_case(name: str, data: str | bytes, *needles: str):
    def build(tmp, const):
        path = _write(tmp / name, data)
        return stage_args("critique", tmp, const, f"critique.prompts.source={path}"), [name, *needles]
    return build


def _fake_gguf(tmp, const):
    fake = _write(tmp / "model.gguf", b"not a gguf file at all")
    return stage_args("critique", tmp, const, f"model.name={fake}"), ["model.gguf", "GGUF"]


def _runs_dir_is_file(tmp, const):
    blocker = _write(tmp / "runs_file", "I am a file\n")
    return [*stage_args("critique", tmp, const), *sets(f"runs_dir={blocker}")], [f"{blocker} is a file, not a folder"]


def _missing_config_for_run(tmp, const):
    return ["run", tmp / "nope.yaml"], ["nope.yaml", "does not exist"]


def _from_unknown_stage(tmp, const):
    cfg = _write(tmp / "run.yaml", _run_yaml(tmp, const))
    return ["run", cfg, "--from", "nosuchstage"], ["nosuchstage", "critique"]


def _report_not_a_run(tmp, const):
    folder = tmp / "holiday_photos"
    _write(folder / "beach.txt", "sand\n")
    return ["report", folder], ["holiday_photos", "not a cai run folder"]


def _mc_eval_bad_row(tmp, const):
    bad = _write(tmp / "mc.jsonl", json.dumps({"prompt": "Which is kinder?", "corrects": "A"}) + "\n")
    return ["mc-eval", bad, "--model", tmp / NO_MODEL], ["mc.jsonl", "line 1", "corrects"]


def _mc_eval_not_json(tmp, const):
    bad = _write(tmp / "mc.jsonl", '{"prompt": "Which is kinder?",\n')
    return ["mc-eval", bad, "--model", tmp / NO_MODEL], ["mc.jsonl", "line 1", "not valid JSON"]


def _extra_data_missing(tmp, const):
    cfg = _write(tmp / "run.yaml", _run_yaml(tmp, const))
    return ["run", cfg, *sets("sft.extra_data=/nope/extra.jsonl")], ["/nope/extra.jsonl"]


def _late_prompt_set_missing(tmp, const):
    # A mistake in the last stage's prompts fails `cai run` before the first stage starts.
    cfg = _write(tmp / "run.yaml", _run_yaml(tmp, const))
    return ["run", cfg, *sets("eval.red_team.source=/nope/held_out.jsonl")], ["/nope/held_out.jsonl"]


def _run_yaml(tmp: Path, const: Path) -> str:
    return f"name: r\nruns_dir: {tmp / 'runs'}\nmodel: {{name: {tmp / NO_MODEL}}}\nconstitution: {const}\n"


def _run_case(*overrides: str, needles: list[str]):
    def build(tmp, const):
        return ["run", _write(tmp / "run.yaml", _run_yaml(tmp, const)), *sets(*overrides)], needles
    return build


def _duplicate_ids() -> str:
    return SMALL_CONSTITUTION.replace("  - id: evasive", "  - id: harm")


CASES = {
    # configs
    "config-malformed-yaml": _config_case("critique:\n  rounds: [1, 2\n", "not valid YAML", "line"),
    "config-unknown-top-key": _config_case("nmae: typo\n", "unknown key 'nmae'"),
    "config-unknown-nested-key": _config_case("critique:\n  roudns: 2\n", "unknown key 'critique.roudns'", "rounds"),
    "config-not-a-mapping": _config_case("- critique\n- sft\n", "mapping"),
    "config-not-utf8": _config_case(b"name: caf\xe9\n", "UTF-8"),
    "config-missing": lambda tmp, const: (["critique", "-c", tmp / "nope.yaml"], ["nope.yaml", "does not exist"]),
    "config-is-a-folder": lambda tmp, const: (["critique", "-c", tmp], [str(tmp), "folder"]),
    "run-config-missing": _missing_config_for_run,
    "override-unknown-nested-key": lambda tmp, const: (
        stage_args("critique", tmp, const, "sample.sampling.temprature=1"), ["sample.sampling.temprature"]),
    "override-wrong-type": lambda tmp, const: (
        stage_args("critique", tmp, const, "critique.rounds=many"), ["critique.rounds", "many"]),
    "override-wrong-bool": lambda tmp, const: (
        stage_args("critique", tmp, const, "model.trust_remote_code=perhaps"), ["model.trust_remote_code", "perhaps"]),
    "override-out-of-range": lambda tmp, const: (stage_args("critique", tmp, const, "sample.k=1"), ["sample.k", "2"]),
    "override-bad-choice": lambda tmp, const: (
        stage_args("critique", tmp, const, "model.dtype=float8"), ["model.dtype", "float8"]),
    "override-without-equals": lambda tmp, const: (
        stage_args("critique", tmp, const, "critique.rounds"), ["critique.rounds", "key=value"]),
    "override-into-a-value": lambda tmp, const: (
        stage_args("critique", tmp, const, "seed.value=3"), ["seed", "integer"]),
    # constitutions
    "constitution-missing": lambda tmp, const: (
        stage_args("critique", tmp, const, "constitution=/nope.yaml"), ["/nope.yaml"]),
    "constitution-duplicate-ids": _constitution_case(_duplicate_ids(), "harm"),
    "constitution-malformed-yaml": _constitution_case("name: broken\ncritique_revision_principles: [\n"),
    "constitution-not-utf8": _constitution_case(b"name: caf\xe9\n"),
    # prompts
    "prompts-empty-file": _prompt_case("empty.jsonl", "\n\n"),
    "prompts-not-utf8": _prompt_case("latin1.txt", b"Comment faire du caf\xe9 ?\n"),
    "prompts-malformed-json-line": _prompt_case(
        "prompts.jsonl", '{"prompt": "How do I bake bread?"}\n{"prompt": "unclosed\n{"prompt": "third"}\n', "line 2"),
    "prompts-missing-file": lambda tmp, const: (
        stage_args("critique", tmp, const, "critique.prompts.source=/nope/prompts.jsonl"), ["/nope/prompts.jsonl"]),
    "prompts-unknown-builtin": lambda tmp, const: (
        stage_args("critique", tmp, const, "critique.prompts.source=red-teem"), ["red-teem"]),
    # models
    "model-unknown-path": lambda tmp, const: (stage_args("critique", tmp, const, "model.name=/nope"), ["/nope"]),
    "model-gguf-not-gguf": _fake_gguf,
    "model-http-without-urls": lambda tmp, const: (
        stage_args("critique", tmp, const, "model.backend=http"), ["model.base_urls"]),
    # outputs
    "runs-dir-is-a-file": _runs_dir_is_file,
    # stages run before their inputs exist
    "sft-before-critique": lambda tmp, const: (stage_args("sft", tmp, const), ["cai critique"]),
    "sample-before-sft": lambda tmp, const: (stage_args("sample", tmp, const), ["cai sft", "sample.policy"]),
    "label-before-sample": lambda tmp, const: (stage_args("label", tmp, const), ["cai sample"]),
    "pm-before-label": lambda tmp, const: (stage_args("pm", tmp, const), ["cai label"]),
    "rl-before-pm": lambda tmp, const: (stage_args("rl", tmp, const), ["cai pm"]),
    "dpo-before-label": lambda tmp, const: ([*stage_args("rl", tmp, const), "--algo", "dpo"], ["cai label"]),
    "eval-with-one-model": lambda tmp, const: (stage_args("eval", tmp, const), ["two models"]),
    "rl-unknown-algo": lambda tmp, const: ([*stage_args("rl", tmp, const), "--algo", "trpo"], ["trpo"]),
    # run folders and whole runs
    "status-missing-folder": lambda tmp, const: (["status", tmp / "no_such_run"], ["no_such_run", "does not exist"]),
    "report-not-a-run": _report_not_a_run,
    "report-missing-folder": lambda tmp, const: (["report", tmp / "no_such_run"], ["no_such_run"]),
    "run-from-unknown-stage": _from_unknown_stage,
    "run-extra-data-missing": _extra_data_missing,
    "run-late-prompt-set-missing": _late_prompt_set_missing,
    "run-judge-model-missing": _run_case("label.feedback_model.name=/nope/judge",
                                         needles=["label.feedback_model.name", "/nope/judge"]),
    "run-critic-gguf-missing": _run_case("critique.critic.name=critic.gguf",
                                         needles=["critique.critic.name", "critic.gguf"]),
    "run-http-judge-without-urls": _run_case("eval.judge.backend=http", needles=["eval.judge.base_urls"]),
    "run-runs-dir-is-a-file": lambda tmp, const: _run_case(
        f"runs_dir={_write(tmp / 'runs_file', 'x')}", needles=["runs_file is a file, not a folder"])(tmp, const),
    # other commands
    "mc-eval-bad-row": _mc_eval_bad_row,
    "mc-eval-not-json": _mc_eval_not_json,
    "mc-eval-missing-file": lambda tmp, const: (
        ["mc-eval", tmp / "nope.jsonl", "--model", tmp / NO_MODEL], ["nope.jsonl"]),
    "constitution-validate-duplicate-ids": lambda tmp, const: (
        ["constitution", "validate", _write(tmp / "dup.yaml", _duplicate_ids())], ["dup.yaml", "harm"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(case, cai_cli, tmp_path, small_constitution):
    (tmp_path / NO_MODEL).mkdir()
    args, needles = CASES[case](tmp_path, small_constitution)
    code, _, err = cai_cli(*args)
    line = error_line(code, err, *needles)
    assert NO_MODEL not in line  # failed on the input itself, before any model was loaded
    if args[0] == "run":  # whole runs check every stage's inputs before the first stage starts
        assert not (tmp_path / "runs" / "r" / "critique").exists()
    assert not (tmp_path / "runs" / "r" / "critique" / "data.jsonl").exists()


RUNNING_AS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


def simulate_read_only(monkeypatch, folder: Path) -> None:
    """Make ``folder`` act as read-only even for root, who may write anywhere (and CI runs as root).

    It fakes what the OS does to a folder without write permission: making a folder in it fails
    with EACCES (as `os.mkdir`, under `Path.mkdir`, would) and `os.access(folder, os.W_OK)` is False.
    """
    real_mkdir, real_access = os.mkdir, os.access

    def mkdir(path, *args, **kwargs):
        if Path(path).parent == folder:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_mkdir(path, *args, **kwargs)

    def access(path, mode, *args, **kwargs):
        if Path(path) == folder and mode & os.W_OK:
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "access", access)


@pytest.mark.parametrize("lock", [
    "simulated",
    # The real thing also blocks writes the simulation does not fake; root may write anyway.
    pytest.param("chmod", marks=pytest.mark.skipif(RUNNING_AS_ROOT, reason="root may write to read-only folders")),
])
def test_read_only_runs_dir_is_one_error_line(lock, monkeypatch, cai_cli, tmp_path, small_constitution):
    locked = tmp_path / "locked"
    locked.mkdir()
    if lock == "simulated":
        simulate_read_only(monkeypatch, locked)
    else:
        locked.chmod(0o500)
    try:
        code, _, err = cai_cli(*stage_args("critique", tmp_path, small_constitution,
                                                            f"runs_dir={locked}"))
    finally:
        locked.chmod(0o700)
    error_line(code, err, str(locked))


def test_changed_config_for_an_existing_run_is_refused(cai_cli, tmp_path, small_constitution):
    (tmp_path / NO_MODEL).mkdir()
    cfg = _write(tmp_path / "run.yaml", _run_yaml(tmp_path, small_constitution))
    # The first run records its config, then stops when it tries to load the (empty) model folder.
    code, _, err = cai_cli("run", cfg)
    error_line(code, err, NO_MODEL, "config.json")
    saved = tmp_path / "runs" / "r" / "config.yaml"
    before = saved.read_text()
    code, _, err = cai_cli("run", cfg, "--set", "seed=7")
    error_line(code, err, "different config", "seed", "--from")
    assert saved.read_text() == before


def test_pickle_only_model_folder_needs_allow_pickle(cai_cli, tmp_path, tiny_model_dir):
    import shutil

    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")
    weights.unlink()
    assert (folder / "pytorch_model.bin").is_file() and not list(folder.glob("*.safetensors"))
    code, out, err = cai_cli("generate", "hello", "-m", folder, "--max-new-tokens", "2")
    error_line(code, err, str(folder), "pickle", "allow_pickle=true")
    assert out == ""
    code, out, err = cai_cli("generate", "hello", "-m", folder, "--max-new-tokens", "2",
                         "--set", "model.allow_pickle=true")
    assert code == 0, err
    assert json.loads(out)["messages"][0]["content"] == "hello"


def test_safe_defaults():
    from cai.config import GenerateConfig, RunConfig

    for model in (RunConfig().model, GenerateConfig().model):
        assert model.trust_remote_code is False
        assert model.allow_pickle is False
        assert model.api_key_env == "OPENAI_API_KEY"


# ---------------------------------------------------------------- crashes and kills

def kill_overrides(model_dir: Path, runs: Path, constitution: Path, name: str) -> list[str]:
    """Tiny stages that write one row per chunk, so a kill lands between rows."""
    return [*tiny_run_overrides(model_dir, runs, constitution, name=name), *PIPELINE_OVERRIDES,
            "critique.prompts.limit=5", "critique.rounds=1", "critique.chunk_size=1", "critique.helpfulness=null",
            f"sample.policy={model_dir}", "sample.prompts.limit=5", "sample.helpfulness=null", "sample.chunk_size=1",
            "label.chunk_size=1", "sft.epochs=2", "sft.save_every=2", "pm.epochs=2", "pm.batch_size=2"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir):
    """The data stages run once without interruption, to compare the killed-and-rerun runs with."""
    from cai.config import RunConfig
    from cai.config_loader import load_config
    from cai.stages.critique import run_critique
    from cai.stages.label import run_label
    from cai.stages.sample import run_sample

    root = tmp_path_factory.mktemp("reference")
    constitution = _write(root / "small.yaml", SMALL_CONSTITUTION)
    cfg = load_config(RunConfig, None, kill_overrides(tiny_model_dir, root / "runs", constitution, "ref"))
    for step in (run_critique, run_sample, run_label):
        step(cfg, show_progress=False)
    return cfg


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


# Run `cai` in a child process whose JSONL writes are slowed down (like a slow model or disk), so a
# SIGKILL sent after the first row reliably lands in the middle of the stage on any machine.
THROTTLED_CAI = """
import sys, time
import cai.io
_write = cai.io.JsonlWriter.write
def _slow_write(self, row):
    _write(self, row)
    time.sleep(0.25)
cai.io.JsonlWriter.write = _slow_write
from cai.cli import main
sys.argv[0] = "cai"
main()
"""


def kill_mid_stage(args: list[str], ready, tmp_path: Path, timeout: float = 120) -> None:
    """Start `cai ARGS` in a child process, SIGKILL it as soon as `ready()` is true."""
    log = tmp_path / "killed_stage.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("wb") as stderr:
        proc = subprocess.Popen([sys.executable, "-c", THROTTLED_CAI, *map(str, args)], env=env,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.time() + timeout
    try:
        while not ready():
            assert proc.poll() is None, f"`cai {args[0]}` ended before it could be killed:\n{log.read_text()}"
            assert time.time() < deadline, f"`cai {args[0]}` wrote nothing in {timeout} s:\n{log.read_text()}"
            time.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the stage finished before the kill; it must be killed mid-run"


def rows_written(path: Path, n: int = 1):
    return lambda: path.is_file() and path.read_bytes().count(b"\n") >= n


def tear(path: Path) -> None:
    """A crash in the middle of writing a row leaves half a JSON object with no newline."""
    with path.open("ab") as f:
        f.write(b'{"id": "half-written-row", "respon')


def check_jsonl(path: Path, expected_ids: set) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]  # every line is JSON
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "duplicate rows after the rerun"
    assert set(ids) == expected_ids
    return rows


@pytest.mark.parametrize("stage, file, count_keys", [
    ("critique", "critique/data.jsonl", ["rows", "prompts"]),
    ("sample", "sample/red-team.jsonl", ["red-team_prompts"]),
    ("label", "label/data.jsonl", ["pairs"]),
])
def test_kill_9_during_a_data_stage_then_rerun(stage, file, count_keys, reference, cai_cli, tmp_path,
                                               tiny_model_dir):
    import shutil

    constitution = _write(tmp_path / "small.yaml", SMALL_CONSTITUTION)
    overrides = kill_overrides(tiny_model_dir, tmp_path / "runs", constitution, "k")
    run = tmp_path / "runs" / "k"
    earlier = {"critique": [], "sample": ["critique"], "label": ["critique", "sample"]}[stage]
    for folder in earlier:  # this stage's inputs, made without interruption
        shutil.copytree(reference.run_dir / folder, run / folder)
    target = run / file
    kill_mid_stage([stage, *sets(*overrides)], rows_written(target), tmp_path)
    kept = [r["id"] for r in read_jsonl(target, repair=True)]
    expected = {r["id"] for r in read_jsonl(reference.run_dir / file)}
    assert 1 <= len(kept) < len(expected)
    assert _manifest(target.parent)["status"] == "running"
    tear(target)

    code, _, err = cai_cli(stage, *sets(*overrides))
    assert code == 0, err
    rows = check_jsonl(target, expected)
    assert [r["id"] for r in rows[: len(kept)]] == kept  # finished rows were kept, not redone
    manifest, ref = _manifest(target.parent), _manifest(reference.run_dir / file.split("/")[0])
    assert manifest["status"] == "done" and manifest["attempts"] == 2
    for key in count_keys:
        assert manifest["counts"][key] == ref["counts"][key]


def test_disk_full_keeps_finished_rows(reference, monkeypatch, cai_cli, tmp_path, tiny_model_dir):
    """ENOSPC in the middle of `cai critique`: one error line, finished rows stay, the rerun completes."""
    import errno

    import cai.io

    constitution = _write(tmp_path / "small.yaml", SMALL_CONSTITUTION)
    overrides = kill_overrides(tiny_model_dir, tmp_path / "runs", constitution, "full")
    data = tmp_path / "runs" / "full" / "critique" / "data.jsonl"

    class FillingFile:
        """The data file of a disk that fills up on the third row: half the row lands, then ENOSPC."""

        def __init__(self, f):
            self._f, self.rows = f, 0

        def write(self, text):
            self.rows += 1
            if self.rows == 3:
                self._f.write(text[: len(text) // 2])
                self._f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self._f.write(text)

        def __getattr__(self, name):
            return getattr(self._f, name)

    real_init = cai.io.JsonlWriter.__init__

    def init(self, path, **kw):
        real_init(self, path, **kw)
        if Path(path) == data:
            self._f = FillingFile(self._f)

    with monkeypatch.context() as m:
        m.setattr(cai.io.JsonlWriter, "__init__", init)
        code, _, err = cai_cli("critique", *sets(*overrides))
    error_line(code, err, "no space left", str(data))
    lines = data.read_bytes().split(b"\n")
    assert [json.loads(line)["id"] for line in lines[:2]] and len(lines) == 3  # two whole rows, then the torn one
    assert _manifest(data.parent)["status"] == "running"

    code, _, err = cai_cli("critique", *sets(*overrides))
    assert code == 0, err
    check_jsonl(data, {r["id"] for r in read_jsonl(reference.run_dir / "critique" / "data.jsonl")})
    assert _manifest(data.parent)["attempts"] == 2


@pytest.mark.parametrize("stage, folder, earlier, ready_file", [
    ("sft", "sft", ["critique"], "checkpoint/state.json"),
    ("pm", "pm", ["critique", "sample", "label"], "train_log.jsonl"),
])
def test_kill_9_during_training_then_rerun(stage, folder, earlier, ready_file, reference, cai_cli,
                                           tmp_path, tiny_model_dir):
    """A kill mid-training (after a checkpoint for SFT) and a torn log line: the rerun finishes cleanly."""
    import shutil

    constitution = _write(tmp_path / "small.yaml", SMALL_CONSTITUTION)
    overrides = kill_overrides(tiny_model_dir, tmp_path / "runs", constitution, "k")
    run = tmp_path / "runs" / "k"
    for name in earlier:
        shutil.copytree(reference.run_dir / name, run / name)
    out = run / folder
    kill_mid_stage([stage, *sets(*overrides)], lambda: (out / ready_file).is_file(), tmp_path)
    assert _manifest(out)["status"] == "running"
    assert not (out / "model.safetensors").exists()
    tear(out / "train_log.jsonl")

    code, _, err = cai_cli(stage, *sets(*overrides))
    assert code == 0, err
    manifest = _manifest(out)
    assert manifest["status"] == "done" and manifest["attempts"] == 2
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    if stage == "sft":  # resumed from the checkpoint and finished every step
        assert log[-1]["step"] == manifest["counts"]["steps"] and not (out / "checkpoint").exists()
    assert (out / "model.safetensors").is_file()
    code, _, err = cai_cli("report", run)  # reads the SFT log
    assert code == 0, err


# ---------------------------------------------------------------- secrets

SECRET = "sk-test-SECRET123"
CUSTOM_SECRET = "sk-test-CUSTOM456"


def test_api_keys_never_reach_files_logs_or_reprs(monkeypatch, cai_cli, tmp_path, tiny_model_dir, tiny_backend):
    """A run whose model is served over HTTP with a bearer key: the key is used, and written nowhere."""
    from cai.backends.openai_http import OpenAIHTTPBackend
    from cai.serve.server import serve_app

    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    monkeypatch.setenv("CAI_TEST_KEY", CUSTOM_SECRET)
    constitution = _write(tmp_path / "small.yaml", SMALL_CONSTITUTION)
    run = tmp_path / "runs" / "s"
    with serve_app(tiny_backend, "tiny", port=0, api_key=CUSTOM_SECRET).start() as server:
        http = ["model.backend=http", f"model.base_urls={json.dumps([server.url])}", "model.name=tiny",
                "model.api_key_env=CAI_TEST_KEY", f"model.tokenizer={tiny_model_dir}", "model.max_retries=0",
                "sample.policy=tiny", f"pm.base={tiny_model_dir}"]
        overrides = [*kill_overrides(tiny_model_dir, tmp_path / "runs", constitution, "s"), *http]
        printed = ""
        for stage in ("critique", "sample", "label", "pm"):
            code, out, err = cai_cli(stage, *sets(*overrides))
            assert code == 0, err
            printed += out + err
        # A wrong key is refused by the server; the error names the variable, never a key.
        monkeypatch.setenv("CAI_TEST_KEY", SECRET)
        code, out, err = cai_cli("critique", *sets(*overrides, "name=wrong-key"))
        line = error_line(code, err, "401", "CAI_TEST_KEY")
        printed += out + err
        backend = OpenAIHTTPBackend([server.url], "tiny", api_key_env="CAI_TEST_KEY")
        assert SECRET not in repr(backend) and SECRET not in str(backend) and "CAI_TEST_KEY" in repr(backend)
        backend.close()
    code, out, err = cai_cli("report", run)
    assert code == 0, err
    printed += out + err
    assert (run / "report.html").is_file() and (run / "pm" / "README.md").is_file()
    assert "api_key_env: CAI_TEST_KEY" in (run / "label" / "config.yaml").read_text()  # the name, not the key
    files = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert len(files) >= 10
    for path in files:
        content = path.read_bytes()
        for key in (SECRET, CUSTOM_SECRET, SECRET[3:], CUSTOM_SECRET[3:]):
            assert key.encode() not in content, f"{key} written to {path}"
    for key in (SECRET, CUSTOM_SECRET):
        assert key not in printed and key not in line
