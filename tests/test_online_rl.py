"""RLOO and GRPO (TRL) as RL-CAI stages: choosing them in rl.algo, the TRL config they make, and whole
stages on a tiny model (the folder, its log and manifest, eval and the report read them)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import fields

import pytest
import torch

from cai.config import GRPOConfig, RLOOConfig, RunConfig, VLLMRolloutConfig, rl_algorithms
from cai.config_loader import load_config
from cai.data import PromptRow
from cai.errors import CaiError
from cai.io import read_jsonl


@pytest.fixture(autouse=True)
def _one_thread():
    """A 32-wide model runs faster on one thread, and far faster on a CPU that other work shares."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def rows(n: int, tag: str = "p") -> list[PromptRow]:
    return [PromptRow(id=f"{tag}{i}", messages=[{"role": "user", "content": f"question {i}"}]) for i in range(n)]


# ---- choosing algorithms ------------------------------------------------------------------------------

@pytest.mark.parametrize(("given", "picked"), [
    ("ppo", ["ppo"]), ("both", ["ppo", "dpo"]), ("[rloo]", ["rloo"]), ("[grpo, ppo, grpo]", ["ppo", "grpo"]),
    ("ppo,rloo", ["ppo", "rloo"]), ("[both, grpo]", ["ppo", "dpo", "grpo"]),
])
def test_rl_algo_is_one_name_a_list_or_both(given, picked):
    assert load_config(RunConfig, None, [f"rl.algo={given}"]).rl.algo == picked  # in pipeline order, once each


@pytest.mark.parametrize("given", ["trpo", "[ppo, trpo]", "[]"])
def test_an_unknown_rl_algo_is_one_clear_error(given):
    with pytest.raises(CaiError) as err:
        load_config(RunConfig, None, [f"rl.algo={given}"])
    message = str(err.value)
    assert f"override 'rl.algo={given}'" in message and "ppo, dpo, rloo, grpo" in message
    assert ("'trpo'" in message) if "trpo" in given else ("names no algorithm" in message)


def test_the_pipeline_and_status_follow_rl_algo(tmp_path):
    from cai.pipeline import stages_of_run
    from cai.runs import stage_status

    cfg = load_config(RunConfig, None, ["rl.algo=[ppo, rloo]"])
    assert [s for s in stages_of_run(cfg) if s in ("ppo", "dpo", "rloo", "grpo")] == ["ppo", "rloo"]
    status = {r["stage"]: r["status"] for r in stage_status(tmp_path, cfg.rl.algo)}
    assert status["rloo"] == "not started" and status["grpo"] == "not in this run (rl.algo: ppo, rloo)"
    legacy = {r["stage"]: r["status"] for r in stage_status(tmp_path, "both")}  # a config saved before lists
    assert legacy["dpo"] == "not started" and legacy["rloo"].startswith("not in this run")


def test_cli_rl_algo_takes_a_comma_list_and_refuses_unknown_names(cai_cli):
    assert rl_algorithms("grpo,ppo") == ["ppo", "grpo"]
    code, _, err = cai_cli("rl", "--algo", "ppo,trpo")
    assert code == 1 and "--algo: unknown rl.algo 'trpo'" in err and "Traceback" not in err


# ---- the pieces -------------------------------------------------------------------------------------

def test_helpfulness_prompts_make_up_the_configured_share():
    from cai.train.online_rl import mix_prompts

    mixed = mix_prompts(rows(30, "r"), rows(20, "h"), 0.25, seed=0)
    assert len(mixed) == 40 and sum(r.id.startswith("h") for r in mixed) == 10
    assert len(mix_prompts(rows(30, "r"), rows(4, "h"), 0.5, seed=0)) == 34  # capped by what exists
    assert mix_prompts(rows(3, "r"), rows(4, "h"), 0.0, seed=0) == rows(3, "r")


def test_trl_config_runs_fp32_on_cpu_and_passes_vllm_options_through(tmp_path):
    import torch
    import trl

    from cai.train.online_rl import trl_config

    grpo = GRPOConfig(steps=3, prompts_per_step=2, generations=4, loss_type="dr_grpo", scale_rewards="none")
    args = trl_config(grpo, out_dir=tmp_path, on_gpu=False, dtype=torch.float32, seed=1)
    assert isinstance(args, trl.GRPOConfig)
    assert (args.bf16, args.fp16, args.use_cpu, args.activation_checkpointing) == (False, False, True, False)
    assert (args.per_device_train_batch_size, args.num_generations, args.max_steps) == (8, 4, 3)
    assert (args.loss_type, args.scale_rewards, args.beta, args.use_vllm) == ("dr_grpo", "none", 0.05, False)
    rloo = trl_config(RLOOConfig(normalize_advantages=True), out_dir=tmp_path, on_gpu=False,
                      dtype=torch.float32, seed=1)
    assert isinstance(rloo, trl.RLOOConfig) and rloo.normalize_advantages and not rloo.bf16
    vllm = VLLMRolloutConfig(enabled=True, mode="server", server_port=8123).trl_kwargs()
    for cls in (trl.RLOOConfig, trl.GRPOConfig):  # every option we pass is one TRL 1.16 has
        assert set(vllm) <= {f.name for f in fields(cls)}
    assert vllm["use_vllm"] and vllm["vllm_mode"] == "server" and vllm["vllm_server_port"] == 8123


def test_vllm_rollouts_without_vllm_are_refused_naming_the_switch(monkeypatch):
    import importlib.util

    from cai.backends.vllm import require_vllm

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(CaiError, match=r"rl\.grpo\.vllm\.enabled needs the vllm package.*"
                                       r"set rl\.grpo\.vllm\.enabled=false"):
        require_vllm("rl.grpo.vllm.enabled")


def test_log_records_use_ppo_names_and_kl_per_answer():
    from cai.train.online_rl import log_records

    history = [{"step": 0, "eval_reward": 0.5},
               {"step": 1, "reward": 1.5, "reward_std": 0.2, "kl": 0.1, "entropy": 3.0,
                "completions/mean_length": 8.0, "loss": 0.01},
               {"step": 1, "train_runtime": 3.0}]
    assert log_records(history) == [
        {"step": 0, "eval_reward": 0.5},
        {"step": 1, "reward_mean": 1.5, "reward_std": 0.2, "kl": 0.8, "kl_per_token": 0.1, "entropy": 3.0,
         "response_length": 8.0, "completions/mean_length": 8.0, "loss": 0.01}]


# ---- whole stages on the tiny run -----------------------------------------------------------------------

ONLINE = ["rl.rloo.steps=3", "rl.rloo.prompts_per_step=2", "rl.rloo.generations=2", "rl.rloo.max_new_tokens=6",
          "rl.rloo.eval_prompts.limit=3", "rl.rloo.eval_every=2", "rl.rloo.learning_rate=0.001",
          "rl.rloo.prompts.limit=6", "rl.rloo.helpfulness.limit=2"]


def copied_run(tiny_run, tmp_path, overrides):
    """The tiny run's folder copied (its pm and sft done), with a config changed by ``overrides``."""
    runs = tmp_path / "runs"
    shutil.copytree(tiny_run.run_dir, runs / tiny_run.name)
    data = tiny_run.model_dump(mode="json")
    data["runs_dir"] = str(runs)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(data))
    return load_config(RunConfig, path, overrides)


def test_a_run_with_ppo_and_rloo_trains_both_and_compares_them(tiny_run, tmp_path):
    """`rl.algo: [ppo, rloo]` on a finished tiny run, redone from ppo: both stages run, eval compares
    both, the report draws RLOO's curves, status says dpo and grpo are not in this run."""
    from transformers import AutoModelForCausalLM

    from cai.pipeline import run_all
    from cai.runs import stage_status

    cfg = copied_run(tiny_run, tmp_path, ["rl.algo=[ppo, rloo]", *ONLINE])
    run_all(cfg, from_stage="ppo", show_progress=False)
    folder = cfg.run_dir / "rloo"
    rloo, sft = AutoModelForCausalLM.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(cfg.run_dir / "sft")
    assert any(not torch.equal(p, q) for p, q in zip(rloo.parameters(), sft.parameters()))  # it trained the policy
    assert (folder / "README.md").is_file()
    assert not (folder / "trainer").exists() and not (cfg.run_dir / "dpo").exists()
    counts = json.loads((folder / "manifest.json").read_text())["counts"]
    assert counts["steps"] == 3 and counts["prompts"] == 8  # 6 red-team + 2 helpfulness (a quarter)
    assert math.isfinite(counts["eval_reward_start"]) and math.isfinite(counts["eval_reward_end"])
    log = read_jsonl(folder / "train_log.jsonl")
    assert counts["max_kl"] == max(r["kl"] for r in log if r.get("kl") is not None)
    assert [r["step"] for r in log if "reward_mean" in r] == [1, 2, 3]
    assert [r["step"] for r in log if "eval_reward" in r] == [0, 2, 3]  # start, every 2 steps, end
    for key in ("reward_std", "kl", "kl_per_token", "entropy", "response_length", "loss", "grad_norm"):
        assert all(key in r for r in log if "reward_mean" in r), key
    assert "RLOO" in (folder / "README.md").read_text()
    results = json.loads((cfg.run_dir / "eval" / "results.json").read_text())
    assert {"ppo", "rloo"} <= set(results["models"]) and "dpo" not in results["models"]
    from cai.report.html import online_rl_curves

    assert len(online_rl_curves(folder / "train_log.jsonl", "RLOO")) == 2  # reward and KL, as for PPO
    assert (cfg.run_dir / "report.html").is_file()
    status = {r["stage"]: r["status"] for r in stage_status(cfg.run_dir, cfg.rl.algo)}
    assert status["rloo"] == "done" and status["grpo"].startswith("not in this run")


def test_grpo_stage_with_lora_saves_a_merged_model_and_its_adapter(tiny_run, tmp_path):
    from cai.models import load_model
    from cai.pipeline import run_stage

    grpo = [o.replace("rl.rloo.", "rl.grpo.") for o in ONLINE]
    cfg = copied_run(tiny_run, tmp_path, ["rl.algo=grpo", *grpo, "rl.grpo.lora.enabled=true", "rl.grpo.lora.r=4",
                                          "rl.grpo.lora.dropout=0.0", "rl.grpo.learning_rate=0.01"])
    folder = run_stage(cfg, "grpo", show_progress=False)
    assert (folder / "adapter" / "adapter_config.json").is_file() and (folder / "model.safetensors").is_file()
    merged, sft = load_model(str(folder)).model, load_model(str(cfg.run_dir / "sft")).model
    assert any(not torch.equal(p, q) for p, q in zip(merged.parameters(), sft.parameters()))  # the adapter merged in
    log = read_jsonl(folder / "train_log.jsonl")
    steps = [r for r in log if "reward_mean" in r]
    assert len(steps) == 3 and steps[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts at zero
    assert run_stage(cfg, "grpo", show_progress=False) == folder  # finished: skipped, not redone


def test_an_interrupted_rloo_resumes_from_its_checkpoint(tiny_run, tmp_path, monkeypatch):
    """A crash in step 3 after a checkpoint at step 2: the rerun resumes there, and the log (kept in
    the checkpoint) has each step and each held-out measurement once."""
    from cai.train import online_rl

    config = RLOOConfig(steps=4, prompts_per_step=2, generations=2, max_new_tokens=6, eval_every=2, save_every=2,
                        learning_rate=1e-3)
    kwargs = dict(policy_spec=str(tiny_run.run_dir / "sft"), pm_folder=tiny_run.run_dir / "pm", out_dir=tmp_path / "rloo",
                  config=config, show_progress=False)
    real = online_rl.pm_reward

    def crash_in_step_three(scorer):
        reward, calls = real(scorer), []

        def preference_model(**kw):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return reward(**kw)

        return preference_model

    monkeypatch.setattr(online_rl, "pm_reward", crash_in_step_three)
    with pytest.raises(KeyboardInterrupt):
        online_rl.train_online_rl("rloo", rows(4), rows(2, "e"), **kwargs)
    assert (tmp_path / "rloo" / "trainer" / "checkpoint-2").is_dir()
    monkeypatch.undo()
    metrics = online_rl.train_online_rl("rloo", rows(4), rows(2, "e"), **kwargs)
    assert [r["step"] for r in metrics["log"] if "reward_mean" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in metrics["log"] if "eval_reward" in r] == [0, 2, 4]
    assert not (tmp_path / "rloo" / "trainer").exists()
