"""SL-CAI under ``accelerate launch`` with two CPU processes (DDP over gloo), end to end.

Why ``--multi_gpu`` on a machine without GPUs: ``accelerate launch --cpu --num_processes 2``
starts one process unless MPI is set up (its CPU launcher runs ``mpirun``). The torchrun-based
launcher behind ``--multi_gpu`` starts both ranks, and ``ACCELERATE_USE_CPU=1`` plus
``Accelerator(cpu=True)`` in `train_sft` make them a CPU process group on gloo.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

DRIVER = textwrap.dedent('''
    """One rank of a tiny SFT run; writes rank<i>.json with a hash of its trained weights."""
    import hashlib, json, sys

    import cai.train.sft as sft
    from cai.config import SFTConfig

    model_dir, out_dir, results = sys.argv[1:4]
    seen = {}
    apply_lora = sft.apply_lora


    def weights_hash(model):
        h = hashlib.sha256()
        for name, p in sorted(model.named_parameters()):
            if p.requires_grad:
                h.update(name.encode() + p.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()


    def keep_model(model, lora):  # the model train_sft trains (before accelerate wraps it)
        model = apply_lora(model, lora)
        seen["model"], seen["initial"] = model, weights_hash(model)
        return model


    sft.apply_lora = keep_model
    chats = json.loads(open(sys.argv[4]).read())
    config = SFTConfig(epochs=2, batch_size=2, learning_rate=0.01, warmup_ratio=0.0, max_length=64,
                       save_every=1000, dtype="float32")
    metrics = sft.train_sft(chats, model_spec=model_dir, out_dir=out_dir, config=config, device="cpu",
                            show_progress=False)

    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    with open(f"{results}/rank{rank}.json", "w") as f:
        json.dump({"process_index": rank, "num_processes": world, "steps": metrics["steps"],
                   "initial": seen["initial"], "final": weights_hash(seen["model"])}, f)
''')


def chats(n: int) -> list[list[dict[str, str]]]:
    return [[{"role": "user", "content": f"Question number {i}?"},
             {"role": "assistant", "content": f"Answer {i}: be kind and careful."}] for i in range(n)]


def kill_tree(pid: int) -> None:
    """Kill a launcher and every rank under it (torchrun starts each rank in a session of its own)."""
    import psutil

    try:
        parent = psutil.Process(pid)
        processes = [*parent.children(recursive=True), parent]
    except psutil.NoSuchProcess:
        return
    for process in processes:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(processes, timeout=10)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("examples", [8, 10], ids=["4-batches", "5-batches"])
def test_sft_on_two_cpu_processes_trains_one_model_and_saves_it_once(tmp_path, tiny_model_dir, examples):
    from transformers import AutoModelForCausalLM

    from cai.train.common import warmup_linear_decay

    driver, data, out, results = tmp_path / "driver.py", tmp_path / "chats.json", tmp_path / "sft", tmp_path / "ranks"
    driver.write_text(DRIVER)
    data.write_text(json.dumps(chats(examples)))
    results.mkdir()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf"),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()),
               str(driver), str(tiny_model_dir), str(out), str(results), str(data)]
    log_path = tmp_path / "launch.log"
    with log_path.open("w") as log_file:
        launcher = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=log_file, stderr=subprocess.STDOUT)
        try:
            launcher.wait(timeout=120)
        except subprocess.TimeoutExpired:
            kill_tree(launcher.pid)
            pytest.fail(f"the two ranks did not finish in 120 s (one waiting in a collective the other never "
                        f"joined?)\n{log_path.read_text()[-3000:]}")
    assert launcher.returncode == 0, log_path.read_text()[-3000:]

    ranks = [json.loads((results / f"rank{i}.json").read_text()) for i in range(2)]
    assert [r["process_index"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)
    assert ranks[0]["steps"] == ranks[1]["steps"] > 0
    assert ranks[0]["final"] != ranks[0]["initial"]  # it trained...
    assert ranks[0]["final"] == ranks[1]["final"]  # ...and DDP kept the two replicas identical

    saved = AutoModelForCausalLM.from_pretrained(out)  # saved once, by rank 0, and loads
    import hashlib

    h = hashlib.sha256()
    for name, p in sorted(saved.named_parameters()):
        h.update(name.encode() + p.detach().float().numpy().tobytes())
    assert h.hexdigest() == ranks[0]["final"]  # the trained weights, not a wrapper's or the initial ones
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == list(range(1, ranks[0]["steps"] + 1))  # one rank logs, once per step
    steps = ranks[0]["steps"]  # the learning-rate schedule counts the steps each rank takes, so it runs to its end
    assert log[-1]["lr"] == pytest.approx(0.01 * warmup_linear_decay(steps - 1, steps, 0))
    assert not (out / "checkpoint").exists()
