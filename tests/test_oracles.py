"""lora_ref.oracles builds PEFT's and bitsandbytes' layers holding lora_ref's exact numbers."""

import copy

import pytest
import torch
from torch import nn

from lora_ref import oracles
from lora_ref import torch as lt


def test_peft_twin_adapts_the_same_layers_with_the_same_factors(tiny_llama):
    ours = lt.add_lora(copy.deepcopy(tiny_llama), r".*\.(q|v)_proj", r=2, alpha=6, rslora=True)
    with torch.no_grad():
        for layer in lt.lora_modules(ours).values():
            layer.lora_B.normal_()
    twin = oracles.peft_twin(tiny_llama, ours)
    theirs = {n.removeprefix("base_model.model."): m for n, m in twin.named_modules() if hasattr(m, "lora_A")
              and "default" in m.lora_A}
    assert list(theirs) == list(lt.lora_modules(ours))
    for name, layer in lt.lora_modules(ours).items():
        assert torch.equal(theirs[name].lora_A["default"].weight, layer.lora_A)
        assert torch.equal(theirs[name].lora_B["default"].weight, layer.lora_B)
        assert theirs[name].scaling["default"] == layer.scaling
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(twin(input_ids=ids).logits, ours(input_ids=ids).logits)
    assert not any(isinstance(m, lt.LoRALinear) for m in tiny_llama.modules())     # the base is untouched


def test_peft_twin_refuses_mixed_hyperparameters_and_empty_models(tiny_llama):
    ours = lt.add_lora(copy.deepcopy(tiny_llama), ["q_proj"], r=2, alpha=4)
    ours = lt.add_lora(ours, ["v_proj"], r=4, alpha=4)
    with pytest.raises(ValueError, match=r"one \(r, alpha, rslora\)"):
        oracles.peft_twin(tiny_llama, ours)
    with pytest.raises(ValueError, match="no LoRA layers"):
        oracles.peft_twin(tiny_llama, tiny_llama)


def test_bnb_linear4bit_holds_the_nf4_of_w0_and_refuses_other_layers():
    from lora_ref import quant
    lin = nn.Linear(64, 32)
    l4 = oracles.bnb_linear4bit(lin)
    assert l4.support_avx512bf16_for_cpu is False
    x = torch.randn(3, 64)
    W = quant.NF4Linear.from_linear(lin).dequantize()                  # (d, k)
    torch.testing.assert_close(l4(x), x @ W.T + lin.bias, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="nn.Linear"):
        oracles.bnb_linear4bit(nn.Conv1d(2, 2, 1))
