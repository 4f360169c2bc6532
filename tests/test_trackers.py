"""`report_to: [tensorboard]` logs the training curves of SFT, the PM and PPO, as TRL users expect."""

from __future__ import annotations

import pytest

from cai.errors import CaiError

pytest.importorskip("tensorboard")


def scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the TensorBoard event files under ``folder``: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return series


def test_sft_and_pm_log_their_curves_to_tensorboard(tiny_model_dir, tmp_path):
    from cai.config import PMConfig, SFTConfig
    from cai.io import read_jsonl
    from cai.train.pm import Pair, train_preference_model
    from cai.train.sft import train_sft

    chats = [[{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
             for i in range(6)]
    config = SFTConfig(epochs=2, batch_size=2, learning_rate=0.01, warmup_ratio=0.0, max_length=64, dtype="float32",
                       report_to=["tensorboard"])
    train_sft(chats, model_spec=str(tiny_model_dir), out_dir=tmp_path / "sft", config=config, device="cpu",
              show_progress=False)
    logged = scalars(tmp_path / "sft")
    log = read_jsonl(tmp_path / "sft" / "train_log.jsonl")
    assert [step for step, _ in logged["loss"]] == [row["step"] for row in log] == list(range(1, 7))
    assert [v for _, v in logged["loss"]] == pytest.approx([row["loss"] for row in log], abs=1e-4)
    assert {"lr", "tokens"} <= logged.keys()

    pairs = [Pair([{"role": "user", "content": f"q{i}"}], f"kind {i}", f"rude {i}", 1.0, str(i)) for i in range(8)]
    pm_config = PMConfig(epochs=1, batch_size=4, learning_rate=1e-3, dtype="float32", report_to=["tensorboard"])
    train_preference_model(pairs[:6], pairs[6:], base=str(tiny_model_dir), out_dir=tmp_path / "pm", config=pm_config,
                           device="cpu", show_progress=False)
    logged = scalars(tmp_path / "pm")
    assert [step for step, _ in logged["loss"]] == [1, 2]
    assert logged["eval_accuracy"][0][0] == 2


def test_ppo_logs_its_curves_to_tensorboard(tiny_run, tmp_path):
    import shutil

    from cai.io import read_jsonl
    from cai.train.ppo import run_ppo

    runs = tmp_path / "runs"
    shutil.copytree(tiny_run.run_dir, runs / tiny_run.name)
    shutil.rmtree(runs / tiny_run.name / "ppo")
    ppo = tiny_run.rl.ppo.model_copy(update={"report_to": ["tensorboard"], "steps": 2})
    cfg = tiny_run.model_copy(update={"runs_dir": str(runs), "rl": tiny_run.rl.model_copy(update={"ppo": ppo})})
    folder = run_ppo(cfg, show_progress=False)
    logged = scalars(folder)
    log = [r for r in read_jsonl(folder / "train_log.jsonl") if "kl" in r]
    assert [step for step, _ in logged["kl"]] == [1, 2]
    assert [v for _, v in logged["reward_mean"]] == pytest.approx([r["reward_mean"] for r in log], abs=1e-4)


def test_a_missing_tracker_package_is_one_sentence(monkeypatch, tmp_path):
    import importlib.util

    from cai.train.trackers import make_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(CaiError, match="wandb needs the wandb package; install it with: pip install wandb"):
        make_trackers(["wandb"], tmp_path, "cai-sft", {})
