"""LoRA adapters folded into a temporary copy of the weights for generation (`cai.train.lora.adapters_folded`)."""

from __future__ import annotations

import pytest
import torch

from cai.config import LoraConfig
from cai.train.lora import adapters_folded, apply_lora


def _adapted(tiny_model_dir):
    """The tiny model with LoRA adapters whose B matrices are random, so the adapters change the outputs."""
    from cai.models import load_model

    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    model = apply_lora(loaded.model, LoraConfig(enabled=True, r=4, alpha=8, dropout=0.1)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model, loaded.tokenizer


def _base_weights(model):
    return {name: p for name, p in model.named_parameters() if "base_layer" in name}


class _AdapterCalls:
    """Counts forward calls of the adapters' A matrices: zero while they are folded away."""

    def __init__(self, model):
        self.count = 0
        self.handles = [m.register_forward_hook(self._hook) for n, m in model.named_modules()
                        if n.endswith("lora_A.default")]
        assert self.handles

    def _hook(self, *_):
        self.count += 1


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_folded_adapters_give_the_adapted_outputs_in_one_product_and_leave_the_weights_bit_identical(tiny_model_dir):
    model, _ = _adapted(tiny_model_dir)
    ids = torch.tensor([[1, 5, 9, 14, 3, 7, 2, 11]])
    weights = _base_weights(model)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in weights.items()}
    adapted = _logits(model, ids)
    with model.disable_adapter():
        plain = _logits(model, ids)
    assert not torch.allclose(adapted, plain, atol=1e-3)  # the adapters matter here
    calls = _AdapterCalls(model)

    with adapters_folded(model):
        folded = _logits(model, ids)
        assert calls.count == 0  # the adapters' own products did not run
        assert all(p.data_ptr() != before[n][0] for n, p in weights.items())  # a copy was swapped in

    torch.testing.assert_close(folded, adapted, atol=1e-5, rtol=1e-5)
    for name, p in weights.items():  # the original tensors are back, not written: no drift of the reference
        assert p.data_ptr() == before[name][0]
        assert torch.equal(p, before[name][1])
    assert torch.equal(_logits(model, ids), adapted)
    assert calls.count > 0  # adapters on again


def test_folded_rollouts_sample_the_same_greedy_tokens(tiny_model_dir):
    from cai.backends.hf import HFBackend
    from cai.types import SamplingParams

    model, tokenizer = _adapted(tiny_model_dir)
    backend = HFBackend(model, tokenizer, batch_size=4, reuse_prefix=False)
    prompts = [[{"role": "user", "content": f"question number {i}"}] for i in range(3)]
    params = SamplingParams(max_new_tokens=12)
    plain = [g.token_ids for g in backend.generate_tokens(prompts, params)]
    with adapters_folded(model):
        folded = [g.token_ids for g in backend.generate_tokens(prompts, params)]
    assert folded == plain


def test_the_weights_come_back_when_the_block_raises(tiny_model_dir):
    model, _ = _adapted(tiny_model_dir)
    weights = _base_weights(model)
    before = {n: p.detach().clone() for n, p in weights.items()}
    with pytest.raises(RuntimeError, match="boom"):
        with adapters_folded(model):
            raise RuntimeError("boom")
    assert all(torch.equal(p, before[n]) for n, p in weights.items())
    calls = _AdapterCalls(model)
    _logits(model, torch.tensor([[1, 2, 3]]))
    assert calls.count > 0


def test_models_it_cannot_fold_run_unchanged(tiny_model_dir):
    from cai.models import load_model

    plain = load_model(str(tiny_model_dir), dtype="float32", device="cpu").model.eval()
    ids = torch.tensor([[1, 5, 9, 14]])
    expected = _logits(plain, ids)
    with adapters_folded(plain):  # no adapters at all
        assert torch.equal(_logits(plain, ids), expected)

    dora, _ = _adapted(tiny_model_dir)
    layers = [m for m in dora.modules() if "default" in getattr(m, "lora_A", {})]
    layers[-1].lora_variant["default"] = object()  # one adapter of a variant (DoRA, say) that can't be folded exactly
    weights = {n: p.data_ptr() for n, p in _base_weights(dora).items()}
    with adapters_folded(dora):  # so nothing is folded, and the adapters stay on
        assert {n: p.data_ptr() for n, p in _base_weights(dora).items()} == weights
        assert not any(layer.disable_adapters for layer in layers)

    from peft import get_peft_model
    from peft import LoraConfig as PeftLoraConfig

    head = get_peft_model(load_model(str(tiny_model_dir), dtype="float32", device="cpu").model,
                          PeftLoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"]))
    weights = {n: p.data_ptr() for n, p in _base_weights(head).items()}
    with adapters_folded(head):  # a head trained whole beside the adapters: switching adapters off would drop it
        assert {n: p.data_ptr() for n, p in _base_weights(head).items()} == weights


def test_half_precision_weights_are_not_folded_where_rounding_would_erase_the_update(tiny_model_dir):
    """A bfloat16 weight keeps 8 bits: adding a small update rounds straight back to the weight itself."""
    model, _ = _adapted(tiny_model_dir)
    layer = next(m for m in model.modules() if "default" in getattr(m, "lora_A", {}))
    weight = layer.get_base_layer().weight
    delta = layer.get_delta_weight("default") * 1e-2  # an update of about 1e-4: early training's size
    erased = (weight.bfloat16() + delta.bfloat16()) == weight.bfloat16()
    assert erased.float().mean() > 0.5  # most of it: why folding in bfloat16 would sample near the reference

    model = model.to(torch.bfloat16)
    weights = {n: p.data_ptr() for n, p in _base_weights(model).items()}
    calls = _AdapterCalls(model)
    with adapters_folded(model):
        assert {n: p.data_ptr() for n, p in _base_weights(model).items()} == weights
        _logits(model, torch.tensor([[1, 2, 3]]))
    assert calls.count > 0  # the adapters ran as they are
