"""The independent implementations ``lora_ref`` is checked against, built to hold the same numbers.

The tests, the benchmark and the QLoRA chapter compare ``lora_ref`` with the tools
practitioners run. Each comparison needs the other tool's layer holding exactly our
weights; this module builds it once, so no test copies the recipe:

* ``peft_twin(base, ours)``: PEFT's LoRA on a copy of ``base``, on the layers where
  ``ours`` has LoRA, with the same r, alpha, rsLoRA flag and the same A and B; with
  ``bnb_4bit=True`` the adapted layers' bases are bitsandbytes ``Linear4bit`` (QLoRA).
* ``bnb_linear4bit(linear)``: bitsandbytes' ``Linear4bit`` holding an ``nn.Linear``'s W0,
  with the switch that avoids its AVX512-BF16 trap.

PEFT and bitsandbytes are imported only when these functions are called.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from . import torch as lt

__all__ = ["bnb_linear4bit", "peft_twin"]


def bnb_linear4bit(linear, blocksize=64, double_quant=False, compute_dtype=torch.float32):
    """The same frozen layer as bitsandbytes stores it: a ``bnb.nn.Linear4bit`` (NF4) holding linear's
    W0 and bias, for comparing with NF4Linear / NF4LoRALinear. By default its constants are fp32 and
    it computes in fp32; ``double_quant=True`` stores them as QLoRA does (bitsandbytes'
    ``compress_statistics``), as ``BitsAndBytesConfig(bnb_4bit_use_double_quant=True)`` loads it.

    Its ``support_avx512bf16_for_cpu`` flag is switched off: otherwise, on CPUs with AVX512-BF16,
    the first eval / no_grad call repacks the weight for a bf16 kernel with no backward, and
    gradients through the layer silently lose the W0 term (tests/test_quant.py shows the trap).
    """
    import bitsandbytes as bnb

    if not isinstance(linear, nn.Linear):
        raise TypeError(f"bnb_linear4bit takes an nn.Linear, got {type(linear).__name__}")
    l4 = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                           compute_dtype=compute_dtype, compress_statistics=double_quant, quant_type="nf4")
    l4.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                  compress_statistics=double_quant, quant_type="nf4", module=l4)
    if linear.bias is not None:
        l4.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    l4.support_avx512bf16_for_cpu = False
    return l4.to("cpu")                                             # Params4bit quantises on its first .to()


def _shared(layers):
    """(r, alpha, rslora): a PEFT config holds one of each, so every LoRA layer must share them."""
    hps = {(m.r, m.alpha, m.rslora) for m in layers.values()}
    if len(hps) != 1:
        raise ValueError(f"a PEFT twin needs one (r, alpha, rslora) for all layers, got {sorted(hps)}")
    return hps.pop()


def peft_twin(base, ours, *, bnb_4bit=False, blocksize=64):
    """A ``PeftModel`` over a copy of ``base`` with the same adapters as ``ours``.

    base:     the model before LoRA (plain ``nn.Linear`` layers), left unchanged
    ours:     ``base`` with lora_ref LoRA layers (``torch.add_lora`` or ``quant.quantize_model_nf4``)
    bnb_4bit: put each adapted layer's W0 in a bitsandbytes ``Linear4bit`` first, so PEFT
              wraps it in its bnb LoRA layer, as in QLoRA
    The twin adapts exactly the layers ``ours`` adapts (full names), with lora_dropout 0,
    the same r, alpha and rsLoRA flag, and A, B copied from ``ours``.
    """
    from peft import LoraConfig, get_peft_model

    layers = lt.lora_modules(ours)
    if not layers:
        raise ValueError("ours has no LoRA layers to copy")
    r, alpha, rslora = _shared(layers)
    model = copy.deepcopy(base)
    for name in layers:
        target = model.get_submodule(name)
        if not isinstance(target, nn.Linear):
            raise TypeError(f"base.{name} is a {type(target).__name__}, not the nn.Linear that ours adapts")
        if bnb_4bit:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, bnb_linear4bit(target, blocksize))
    if bnb_4bit:
        model.is_loaded_in_4bit = True                  # PEFT then dispatches to its bnb LoRA layer
    twin = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, lora_dropout=0.0,
                                            target_modules=list(layers)))
    with torch.no_grad():
        for name, layer in layers.items():
            theirs = twin.base_model.model.get_submodule(name)
            theirs.lora_A["default"].weight.copy_(layer.lora_A)     # A: (r, k)
            theirs.lora_B["default"].weight.copy_(layer.lora_B)     # B: (d, r)
    return twin
