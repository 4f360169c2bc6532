"""One writer per stage folder: a second process on a folder that is being written stops at once.

The processes here are real `cai` processes on the tiny model; the first one's JSONL writes are
slowed down (as by a slow model) so the second starts while the first is still writing.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cai.config import RunConfig
from cai.config_loader import load_config
from cai.errors import CaiError
from cai.locks import acquire_folder, held_folders, holder_path, lock_path, release_folder
from cai.pipeline import prepare_run, run_stage
from conftest import PIPELINE_OVERRIDES, SMALL_CONSTITUTION, tiny_run_overrides

# `cai ARGS` whose JSONL writes and optimizer steps each take longer (as with a slow model), so a
# stage of a few rows or steps lasts several seconds: longer than a second process takes to start.
SLOW_CAI = """
import sys, time
import torch
import cai.io
_write, _step = cai.io.JsonlWriter.write, torch.optim.AdamW.step
def _slow_write(self, row):
    _write(self, row)
    time.sleep(0.6)
def _slow_step(self, *args, **kwargs):
    time.sleep(2.0)
    return _step(self, *args, **kwargs)
cai.io.JsonlWriter.write, torch.optim.AdamW.step = _slow_write, _slow_step
from cai.cli import main
sys.argv[0] = "cai"
main()
"""

PLAIN_CAI = "import sys; from cai.cli import main; sys.argv[0] = 'cai'; main()"


def overrides(model_dir: Path, tmp: Path, name: str = "l") -> list[str]:
    constitution = tmp / "small.yaml"
    constitution.write_text(SMALL_CONSTITUTION)
    return [*tiny_run_overrides(model_dir, tmp / "runs", constitution, name=name), *PIPELINE_OVERRIDES,
            "critique.prompts.limit=5", "critique.rounds=1", "critique.chunk_size=1", "critique.helpfulness=null",
            "sft.epochs=2", "sft.save_every=1"]


def sets(values: list[str]) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def start(code: str, args: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as err:
        return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})


def wait_for(ready, proc: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, f"the first process ended too early:\n{log.read_text()}"
        assert time.time() < deadline, f"nothing happened in {timeout} s:\n{log.read_text()}"
        time.sleep(0.02)


def unique_ids(path: Path) -> list[str]:
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert len(ids) == len(set(ids)), f"duplicate rows in {path}"
    return ids


def test_a_second_critique_stops_at_once_naming_the_first_which_finishes(tmp_path, tiny_model_dir):
    args = ["critique", *sets(overrides(tiny_model_dir, tmp_path))]
    folder = tmp_path / "runs" / "l" / "critique"
    first = start(SLOW_CAI, args, tmp_path / "first.log")
    wait_for(lambda: (folder / "data.jsonl").is_file() and holder_path(folder).is_file(), first, tmp_path / "first.log")

    second = subprocess.run([sys.executable, "-c", PLAIN_CAI, *args], capture_output=True, text=True, timeout=120)
    assert first.poll() is None, "the first process must still be running when the second is refused"
    assert second.returncode == 1
    message = second.stderr.strip()
    assert message.count("\n") == 0, message  # one sentence, no traceback
    assert f"{folder} is being written by another cai process, pid {first.pid} on " in message
    assert "since 20" in message and "(cai critique" in message

    assert first.wait(timeout=120) == 0, (tmp_path / "first.log").read_text()
    assert len(unique_ids(folder / "data.jsonl")) == 5
    assert json.loads((folder / "manifest.json").read_text())["attempts"] == 1  # the second never started it
    assert not holder_path(folder).exists()  # the note goes with the lock


def test_a_second_sft_stops_and_a_killed_holder_never_blocks_the_rerun(tmp_path, tiny_model_dir):
    values = overrides(tiny_model_dir, tmp_path)
    cfg = load_config(RunConfig, None, values)
    run_stage(cfg, "critique", show_progress=False)
    folder = cfg.run_dir / "sft"
    first = start(SLOW_CAI, ["sft", *sets(values)], tmp_path / "first.log")
    wait_for(lambda: (folder / "manifest.json").is_file() and holder_path(folder).is_file(), first,
             tmp_path / "first.log")

    second = subprocess.run([sys.executable, "-c", PLAIN_CAI, "sft", *sets(values)], capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 1 and f"pid {first.pid}" in second.stderr, second.stderr

    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert holder_path(folder).is_file()  # a killed holder leaves its note behind; the lock itself is gone
    run_stage(cfg, "sft", show_progress=False)  # the rerun in this process resumes
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["attempts"] == 2
    lines = (folder / "train_data.jsonl").read_text().splitlines()
    # Written whole once, not appended to by two writers (how many rows the tiny model's revisions
    # leave is the data's business: the manifest counts them).
    assert len(lines) == len(set(lines)) == manifest["counts"]["examples"] >= 4
    assert (folder / "model.safetensors").is_file() or any(folder.glob("*.safetensors"))
    assert held_folders() == []


def test_shards_of_one_stage_run_side_by_side(tmp_path, tiny_model_dir):
    values = overrides(tiny_model_dir, tmp_path)
    procs = [start(SLOW_CAI, ["critique", "--shard", f"{i}/2", *sets(values)], tmp_path / f"shard{i}.log")
             for i in range(2)]
    for i, proc in enumerate(procs):
        assert proc.wait(timeout=180) == 0, (tmp_path / f"shard{i}.log").read_text()
    shards = tmp_path / "runs" / "l" / "critique" / "shards"
    ids = [unique_ids(shards / f"{i}-of-2" / "data.jsonl") for i in range(2)]
    assert len(ids[0]) + len(ids[1]) == 5 and not set(ids[0]) & set(ids[1])


def test_the_lock_is_reentrant_in_one_process_and_given_back(tmp_path):
    folder = tmp_path / "runs" / "r" / "label"
    acquire_folder(folder, "label")
    acquire_folder(folder, "label")  # a second take in the same process is a no-op
    assert lock_path(folder) == tmp_path / "runs" / "r" / ".label.lock" and not folder.exists()
    holder = json.loads(holder_path(folder).read_text())
    assert holder["pid"] == os.getpid() and holder["host"] and holder["since"]
    # Another process can't take it while this one holds it ...
    probe = ("import sys; from cai.locks import acquire_folder; from cai.errors import CaiError\n"
             "try:\n    acquire_folder(sys.argv[1], 'label')\nexcept CaiError as e:\n    print(e); sys.exit(1)\n")
    taken = subprocess.run([sys.executable, "-c", probe, str(folder)], capture_output=True, text=True)
    assert taken.returncode == 1 and f"pid {os.getpid()}" in taken.stdout
    release_folder(folder)
    assert not holder_path(folder).exists() and held_folders() == []
    # ... and can once it is given back.
    assert subprocess.run([sys.executable, "-c", probe, str(folder)]).returncode == 0


@pytest.mark.parametrize("stage, busy", [("pm", "pm"), ("critique", "critique/shards/1-of-2")])
def test_a_rerun_from_a_stage_never_deletes_a_folder_another_process_writes(stage, busy, tmp_path, tiny_model_dir):
    values = overrides(tiny_model_dir, tmp_path)
    cfg = load_config(RunConfig, None, values)
    prepare_run(cfg)
    (cfg.run_dir / busy).mkdir(parents=True)
    (cfg.run_dir / busy / "keep.txt").write_text("busy")
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from cai.locks import acquire_folder; "
                               "acquire_folder(sys.argv[1], 'x'); print('held', flush=True); time.sleep(60)",
                               str(cfg.run_dir / busy)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CaiError, match=f"{stage}: .* is being written by another cai process"):
            prepare_run(cfg, from_stage=stage)
        assert (cfg.run_dir / busy / "keep.txt").is_file() and held_folders() == []
    finally:
        holder.kill()
        holder.wait()
    prepare_run(cfg, from_stage=stage)  # the holder is gone: the redo may delete it now
    assert not (cfg.run_dir / stage).exists() and held_folders() == []
