"""SL-CAI training: answer-only loss masking, the data mix, and critique -> sft end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import tiny_run_overrides

from cai.config import RunConfig
from cai.config_loader import load_config
from cai.errors import CaiError
from cai.io import read_jsonl
from cai.train.answer_loss import IGNORE, tokenize_for_answer_loss
from cai.train.checkpoints import load_checkpoint, save_checkpoint
from cai.train.optim import warmup_linear_decay
from cai.train.sft import build_sft_examples


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_loss_only_on_the_answer(tokenizer):
    chat = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Knead it."}]
    ids, labels = tokenize_for_answer_loss(tokenizer, chat, 512)
    prompt = tokenizer.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE] * n_prompt
    answer = tokenizer.decode([t for t in labels if t != IGNORE])
    assert answer.startswith("Knead it.") and "<|im_end|>" in answer  # learns to stop, too
    assert ids[n_prompt:] == labels[n_prompt:]


def test_long_examples_lose_prompt_tokens_from_the_left(tokenizer):
    chat = [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "Short answer."}]
    ids, labels = tokenize_for_answer_loss(tokenizer, chat, 64)
    assert len(ids) == 64
    assert tokenizer.decode([t for t in labels if t != IGNORE]).startswith("Short answer.")
    with pytest.raises(CaiError):
        tokenize_for_answer_loss(tokenizer, chat[:1], 64)


def _row(i, revisions, kept=None):
    prompt = [{"role": "user", "content": f"q{i}"}]
    rounds = [{"revision": r, "kept_previous": (kept or [False] * len(revisions))[j]} for j, r in enumerate(revisions)]
    return {"prompt": prompt, "rounds": rounds, "messages": [*prompt, {"role": "assistant", "content": revisions[-1]}]}


def test_sft_mix_final_all_and_ratio():
    rows = [_row(0, ["a", "b"]), _row(1, ["c", "c"]), _row(2, ["x", "y"], kept=[True, True])]
    helpful = [[{"role": "user", "content": f"h{i}"}, {"role": "assistant", "content": f"ans{i}"}] for i in range(10)]
    final, counts = build_sft_examples(rows, helpful, revisions="final", helpfulness_ratio=0.5)
    assert counts == {"harmlessness_examples": 2, "helpfulness_examples": 2, "unrevised_rows_skipped": 1}
    everything, counts = build_sft_examples(rows, helpful, revisions="all", helpfulness_ratio=0.0)
    answers = sorted(c[-1]["content"] for c in everything)
    assert answers == ["a", "b", "c"]  # distinct accepted revisions; never-revised rows skipped
    assert counts["helpfulness_examples"] == 0
    again, _ = build_sft_examples(rows, helpful, revisions="final", helpfulness_ratio=0.5)
    assert again == final  # seeded


def test_lr_schedule():
    assert warmup_linear_decay(0, 100, 10) == pytest.approx(0.1)
    assert warmup_linear_decay(9, 100, 10) == pytest.approx(1.0)
    assert warmup_linear_decay(100, 100, 10) == pytest.approx(0.1)


def test_checkpoint_round_trip(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    save_checkpoint(tmp_path / "ckpt", model, opt, {"step": 7})
    fresh = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    assert load_checkpoint(tmp_path / "ckpt", fresh, opt2) == {"step": 7}
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert opt2.state_dict()["state"].keys() == opt.state_dict()["state"].keys()
    assert load_checkpoint(tmp_path / "none", fresh, opt2) is None


def test_critique_then_sft_end_to_end(tiny_model_dir, small_constitution, tmp_path):
    from transformers import AutoModelForCausalLM

    from cai.backends.hf import HFBackend
    from cai.stages.critique import run_critique
    from cai.train.sft import run_sft
    from cai.types import SamplingParams

    cfg = load_config(RunConfig, None, tiny_run_overrides(tiny_model_dir, tmp_path / "runs", small_constitution))
    crit = run_critique(cfg, show_progress=False)
    rows = read_jsonl(crit / "data.jsonl")
    assert len(rows) == 6 and len({r["id"] for r in rows}) == 6
    assert all(len(r["rounds"]) == 2 for r in rows)
    manifest = json.loads((crit / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["counts"]["rows"] == 6
    assert manifest["counts"]["helpfulness_rows"] == 4
    assert (crit / "config.yaml").is_file()

    out = run_sft(cfg, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done"
    counts = manifest["counts"]
    assert counts["mean_loss_last_quarter"] < counts["mean_loss_first_quarter"]  # it learns
    assert (out / "model.safetensors").is_file() and (out / "README.md").is_file()
    assert "small" in (out / "README.md").read_text()
    assert not (out / "checkpoint").exists()
    log = read_jsonl(out / "train_log.jsonl")
    assert [r["step"] for r in log] == list(range(1, counts["steps"] + 1))
    train = read_jsonl(out / "train_data.jsonl")
    assert all(r["messages"][-1]["role"] == "assistant" for r in train)
    # The SL-CAI model loads in the HF backend and answers as transformers' own greedy decoding of it does.
    answer = HFBackend.from_spec(str(out)).generate_tokens(["Hello"], SamplingParams(max_new_tokens=3))[0]
    reference = AutoModelForCausalLM.from_pretrained(out).generate(
        torch.tensor([answer.prompt_ids]), max_new_tokens=3, do_sample=False)[0, len(answer.prompt_ids):].tolist()
    assert answer.token_ids == reference[:len(answer.token_ids)] and (answer.ended or len(answer.token_ids) == 3)
    # A finished stage is skipped.
    assert run_sft(cfg, show_progress=False) == out


def test_sft_resumes_from_its_checkpoint(tiny_model_dir, small_constitution, tmp_path, monkeypatch):
    from cai.stages.critique import run_critique
    from cai.train.sft import run_sft

    cfg = load_config(RunConfig, None, tiny_run_overrides(tiny_model_dir, tmp_path / "runs", small_constitution))
    run_critique(cfg, show_progress=False)
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def crash_after_six(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", crash_after_six)
    with pytest.raises(KeyboardInterrupt):
        run_sft(cfg, show_progress=False)
    out = tmp_path / "runs" / "t" / "sft"
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 4
    monkeypatch.undo()
    run_sft(cfg, show_progress=False)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["attempts"] == 2
    steps = [r["step"] for r in read_jsonl(out / "train_log.jsonl")]
    assert steps[-1] == manifest["counts"]["steps"]
    assert steps.count(5) == 2  # step 5 ran before the crash and again after resuming from step 4


def test_lora_sft_trains_the_adapter_and_saves_it_merged_and_alone(tiny_model_dir, small_constitution, tmp_path):
    """Only the adapter trains; the stage folder is a plain model with the trained adapter merged in,
    and ``adapter/`` holds that same adapter, which peft loads onto the base model."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from cai.stages.critique import run_critique
    from cai.train.sft import run_sft

    overrides = tiny_run_overrides(tiny_model_dir, tmp_path / "runs", small_constitution)
    cfg = load_config(RunConfig, None, [*overrides, "sft.lora.enabled=true", "sft.lora.r=4", "sft.epochs=1"])
    run_critique(cfg, show_progress=False)
    out = run_sft(cfg, show_progress=False)
    counts = json.loads((out / "manifest.json").read_text())["counts"]

    adapter = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    lora_b = {name: t for name, t in adapter.items() if "lora_B" in name}
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b.values())  # peft starts every B at zero
    assert counts["trainable_parameters"] == sum(t.numel() for t in adapter.values())

    assert not (out / "adapter_config.json").exists()  # the folder itself is a plain model
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(out)
    changed = [n for n, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[n])]
    assert changed and all(n.endswith(".weight") and "norm" not in n for n in changed)
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with_adapter = PeftModel.from_pretrained(base, out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(with_adapter(ids).logits, merged.eval()(ids).logits, atol=1e-4, rtol=1e-4)


def test_sft_before_critique_is_a_clear_error(tmp_path):
    cfg = load_config(RunConfig, None, [f"runs_dir={tmp_path}"])
    with pytest.raises(CaiError, match="run `cai critique`"):
        from cai.train.sft import run_sft

        run_sft(cfg)


def test_kill_9_during_critique_then_rerun(tiny_model_dir, small_constitution, tmp_path):
    """A hard kill mid-stage loses at most the chunk in flight; the rerun completes without duplicates."""
    runs = tmp_path / "runs"
    overrides = tiny_run_overrides(tiny_model_dir, runs, small_constitution, name="k")
    overrides = [o for o in overrides if not o.startswith(("critique.prompts.limit", "critique.chunk_size"))]
    args = [sys.executable, "-m", "cai.cli", "critique", *sum((["--set", o] for o in overrides), []),
            "--set", "critique.prompts.limit=12", "--set", "critique.chunk_size=1", "--set", "critique.helpfulness=null"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    data = runs / "k" / "critique" / "data.jsonl"
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (not data.exists() or len(data.read_bytes().splitlines()) < 2):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(read_jsonl(data, repair=True))
    assert 2 <= partial < 12
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    lines = data.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]
    assert len(ids) == 12 and len(set(ids)) == 12
    manifest = json.loads((data.parent / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["attempts"] == 2


def test_split_by_tokens_keeps_every_row_once_within_the_budget():
    from cai.train.batching import split_by_tokens

    lengths = [10, 50, 30, 30, 5, 70]
    chunks = split_by_tokens(lengths, 100)
    assert sorted(i for c in chunks for i in c) == list(range(len(lengths)))
    assert all(len(c) * max(lengths[i] for i in c) <= 100 for c in chunks)
    assert chunks[0] == [5]  # longest first; 2 x 70 > 100, so it goes alone
    assert split_by_tokens(lengths, 40)[0] == [5]  # a row longer than the budget still trains, alone
    assert split_by_tokens(lengths, None) == [[5, 1, 2, 3, 0, 4]]
    assert split_by_tokens([], 100) == []


def _trained_weights(tiny_model_dir, tmp_path, name, **update):
    from cai.config import SFTConfig
    from cai.train.sft import train_sft

    chats = [[{"role": "user", "content": f"question number {i} " * (1 + i % 4)},
              {"role": "assistant", "content": f"an answer of some length {i} " * (1 + (i * 3) % 5)}] for i in range(8)]
    cfg = SFTConfig(batch_size=8, learning_rate=1e-2, warmup_ratio=0.0, max_length=128, **update)
    train_sft(chats, model_spec=str(tiny_model_dir), out_dir=tmp_path / name, config=cfg, show_progress=False)
    from safetensors.torch import load_file

    return load_file(str(tmp_path / name / "model.safetensors")), read_jsonl(tmp_path / name / "train_log.jsonl")


def test_sft_micro_batches_give_the_whole_batch_update(tiny_model_dir, tmp_path):
    """A batch split into small forward passes trains to the same weights and loss as one pass."""
    whole, log_whole = _trained_weights(tiny_model_dir, tmp_path, "whole", micro_batch_tokens=100_000)
    split, log_split = _trained_weights(tiny_model_dir, tmp_path, "split", micro_batch_tokens=60)
    assert log_whole[0]["loss"] == pytest.approx(log_split[0]["loss"], rel=1e-5)
    assert max((whole[k] - split[k]).abs().max().item() for k in whole) < 1e-5
    from safetensors.torch import load_file  # and the update did move the weights

    before = load_file(str(tiny_model_dir / "model.safetensors"))
    assert max((whole[k] - before[k]).abs().max().item() for k in whole if k in before) > 1e-3


def test_answer_loss_equals_the_models_own_loss_from_answer_positions_only(tiny_model_dir):
    """The LM head runs from the first answer-predicting position on, and the loss is the model's own."""
    from cai.models import load_model
    from cai.train.answer_loss import answer_loss, pad_batch

    loaded = load_model(str(tiny_model_dir), device="cpu")
    model, tok = loaded.model.eval(), loaded.tokenizer
    chats = [[{"role": "user", "content": "a long question " * 6}, {"role": "assistant", "content": "short"}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a longer answer here " * 3}]]
    batch = pad_batch([tokenize_for_answer_loss(tok, c, 128) for c in chats], tok.pad_token_id)
    seen = []
    model.register_forward_hook(lambda m, args, out: seen.append(out.logits.shape[1]))
    with torch.no_grad():
        ours = answer_loss(model, batch)
        theirs = model(**batch).loss
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5)
    assert seen[0] < seen[1] == batch["input_ids"].shape[1]  # fewer logits than positions
