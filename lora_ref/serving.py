"""Serving LoRA adapters: many in one batch, merged in and swapped out, and how many fit.

* ``MultiLoRALinear``, ``multi_lora_model``, ``adapter_index`` and ``generate_with_adapters``
  serve a batch whose rows use different adapters, through ``lora_ref.torch.batched_lora_forward``:
  what PEFT does with ``model(..., adapter_names=[...])``, and S-LoRA, Punica, vLLM and LoRAX
  do at scale with their own kernels;
* ``swap_macs`` and ``model_swap_macs`` count what merging an adapter into W0 and unmerging
  it costs; ``swap_drift`` measures, and ``swap_drift_bound`` bounds, how far W0 moves after
  K merge/unmerge cycles in a floating-point format;
* ``adapters_that_fit`` counts the adapters of rank r that fit beside a base model in a memory;
* ``combined_model`` loads a combination of trained adapters (``adapters.combine_adapters``) into a
  copy of the base model, for chapter 09's task arithmetic.

Memory is in bytes; GB in the book means 10^9 bytes.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from . import _checks, budget
from . import torch as lt
from .adapters import read_adapter_factors

__all__ = ["MultiLoRALinear", "multi_lora_model", "adapter_index", "generate_with_adapters", "serving_strategies",
           "padding_overhead",
           "swap_macs", "model_swap_macs", "swap_drift", "swap_drift_bound", "adapters_that_fit", "combined_model"]


# --------------------------------------------------------------------------- many adapters in one batch


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with m adapters; each row of a batch goes through the adapter its index names.

    A: (m, r, k) and B: (m, d, r) are the adapters zero-padded to one rank (``lt.pad_adapters``),
    scalings: (m,). Set the adapter of each sequence with ``adapter_index(model, index)``:
    index (b,) holds one integer in [-1, m) per sequence of the batch, -1 for the base model.
    """

    def __init__(self, base_layer, As, Bs, scalings):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"MultiLoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        W0 = base_layer.weight
        A, B = lt.pad_adapters([a.to(W0) for a in As], [b.to(W0) for b in Bs])
        if tuple(B.shape[1:2]) + tuple(A.shape[2:]) != tuple(W0.shape):
            raise ValueError(f"the adapters update a ({B.shape[1]}, {A.shape[2]}) weight, but this layer's W0 is "
                             f"{tuple(W0.shape)}")
        self.base_layer = base_layer
        self.register_buffer("lora_A", A)                                        # (m, r, k)
        self.register_buffer("lora_B", B)                                        # (m, d, r)
        self.register_buffer("scalings", torch.tensor([float(s) for s in scalings], dtype=W0.dtype))   # (m,)
        self.index = None                                                        # (b,), set by adapter_index
        for p in base_layer.parameters():
            p.requires_grad_(False)

    def forward(self, x):
        if self.index is None:
            raise RuntimeError("no adapter index: run the model inside `with adapter_index(model, index):`")
        b, k = self.index.shape[0], x.shape[-1]
        if x.ndim < 2 or x.shape[0] != b:
            raise ValueError(f"the index names {b} sequences but the input x {tuple(x.shape)} holds "
                             f"{x.shape[0] if x.ndim >= 2 else 'no batch of'} sequences")
        x2 = x.reshape(-1, k)                                                    # (b * T, k)
        rows = self.index.repeat_interleave(x2.shape[0] // b)                    # (b * T,): a sequence's rows
        y = lt.batched_lora_forward(x2, self.base_layer.weight, self.lora_A, self.lora_B, self.scalings, rows)
        if self.base_layer.bias is not None:
            y = y + self.base_layer.bias
        return y.reshape(*x.shape[:-1], y.shape[-1])

    def extra_repr(self):
        m, r = self.lora_A.shape[:2]
        return f"adapters={m}, r={r}"


def multi_lora_model(model, paths):
    """Put the adapters in the PEFT directories ``paths`` side by side into ``model`` (in place).

    Adapter j (its place in ``paths``) becomes index j. Every layer that any adapter adapts
    becomes a ``MultiLoRALinear``; an adapter that leaves a layer alone gets zero factors there.
    Returns the model.
    """
    read = [read_adapter_factors(p) for p in paths]
    if not read:
        raise ValueError("multi_lora_model needs at least one adapter directory")
    names = sorted(set().union(*(factors for _, factors in read)))
    for name in names:
        linear = model.get_submodule(name)
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"model.{name} is a {type(linear).__name__}, not the nn.Linear the adapters update")
        d, k = linear.out_features, linear.in_features
        As, Bs, scalings = [], [], []
        for config, factors in read:
            A, B = factors.get(name, (torch.zeros(1, k), torch.zeros(d, 1)))   # no adapter here: B A = 0
            As.append(A)
            Bs.append(B)
            scalings.append(lt.scaling(config["lora_alpha"], config["r"], config.get("use_rslora", False)))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, MultiLoRALinear(linear, As, Bs, scalings))
    return model


@contextlib.contextmanager
def adapter_index(model, index):
    """Within the block, sequence i of every batch goes through adapter index[i] (-1: the base model)."""
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    if not layers:
        raise ValueError("the model has no MultiLoRALinear layers: build it with multi_lora_model")
    index = torch.as_tensor(index, dtype=torch.long)
    if index.ndim != 1:
        raise ValueError(f"index must be 1-D, one adapter per sequence, got shape {tuple(index.shape)}")
    try:
        for m in layers:
            m.index = index.to(m.lora_A.device)
        yield model
    finally:
        for m in layers:
            m.index = None


def generate_with_adapters(model, prompts, index, max_new_tokens=16):
    """Greedy continuations of ``prompts``, prompt i through adapter index[i], in mixed batches.

    Prompts of equal length are decoded together as one batch, whatever their adapters
    (``lora_ref.tiny.generate`` batches by length), each sequence with its own index.
    """
    from .tiny.training import generate

    if len(index) != len(prompts):
        raise ValueError(f"need one adapter index per prompt: {len(prompts)} prompts, {len(index)} indices")
    by_len = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p.encode("utf-8")), []).append(i)
    out = [None] * len(prompts)
    for rows in by_len.values():
        with adapter_index(model, [int(index[i]) for i in rows]):
            preds = generate(model, [prompts[i] for i in rows], max_new_tokens, batch_size=len(rows))
        for i, pred in zip(rows, preds):
            out[i] = pred
    return out


def serving_strategies(x, W0, As, Bs, scalings, index):
    """Ways to compute one layer's outputs for a batch that mixes adapters, as zero-argument callables.

    x: (n, k); W0: (d, k); As, Bs: lists of m factors A_j (r_j, k), B_j (d, r_j); scalings: m numbers;
    index: (n,) the adapter of each row (0 .. m-1). Each callable returns y: (n, d).
        "gathered", "segmented", "padded", "stacked", "auto":
                        one mixed batch, ``lt.batched_lora_forward(..., method=...)`` on the padded
                        adapters: x W0^T once, the bypasses in one of its four formulations
        "per adapter":  each adapter's rows as a batch of their own (``lt.lora_forward``): W0 is read
                        once per adapter
        "merge":        per adapter, W += s B A in place, its rows through W, W -= s B A: 2 d r k
                        MACs and two passes over W per adapter
        "one adapter":  every row through adapter 0 (``lt.lora_forward``): the same multiply-adds as
                        the mixed batch with none of its bookkeeping, the mark a mixed batch aims at
        "base":         x W0^T alone, the floor
    "merge" works on a copy of W0 made here; rounding moves it by a few units in the last place per swap.
    """
    n, d = x.shape[0], W0.shape[0]
    A_pad, B_pad = lt.pad_adapters(As, Bs)                                     # (m, r, k), (m, d, r)
    s_pad = torch.tensor([float(s) for s in scalings], dtype=x.dtype)          # (m,)
    groups = [(j, (index == j).nonzero().flatten()) for j in range(len(As)) if bool((index == j).any())]
    W = W0.clone()                                                             # the merging server's weight

    def mixed(method):
        return lambda: lt.batched_lora_forward(x, W0, A_pad, B_pad, s_pad, index, method=method)

    def per_adapter():
        y = x.new_empty(n, d)
        for j, rows in groups:
            y[rows] = lt.lora_forward(x[rows], W0, As[j], Bs[j], scalings[j])
        return y

    def merge():
        y = x.new_empty(n, d)
        for j, rows in groups:
            W.addmm_(Bs[j], As[j], alpha=scalings[j])                          # W0 + s B A
            y[rows] = x[rows] @ W.T
            W.addmm_(Bs[j], As[j], alpha=-scalings[j])                         # and back
        return y

    def one_adapter():
        return lt.lora_forward(x, W0, As[0], Bs[0], scalings[0])

    def base():
        return x @ W0.T

    methods = {name: mixed(name) for name in budget.MIXED_BATCH_METHODS + ("auto",)}
    return {**methods, "per adapter": per_adapter, "merge": merge, "one adapter": one_adapter, "base": base}


def padding_overhead(ranks, rows=None):
    """The share of a padded batch's bypass MACs spent on zeros:

        1 - sum_j n_j r_j / (r sum_j n_j),   r = max_j r_j,

    with n_j rows for the adapter of rank r_j (one each by default): every row pays for rank r.

    Book: eq-ch09-padding (notebooks/09_production).
    """
    rows = [1] * len(ranks) if rows is None else list(rows)
    if not ranks or len(rows) != len(ranks):
        raise ValueError(f"need one row count per rank and at least one rank, got ranks={ranks!r}, rows={rows!r}")
    for r in ranks:
        _checks.check_rank(r)
    for n in rows:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"row counts must be integers >= 0, got {rows!r}")
    if sum(rows) == 0:
        raise ValueError("the batch has no rows")
    return 1 - sum(n * r for n, r in zip(rows, ranks)) / (max(ranks) * sum(rows))


# --------------------------------------------------------------------------- merging and swapping


def swap_macs(d, k, r):
    """Multiply-accumulates of merging an adapter into a (d, k) weight and unmerging it: 2 d r k.

    Each of W0 + s B A and W - s B A forms B A once (d r k); the d k additions are left out.
    One token through the factored layer costs d k + r (d + k), so a swap costs about 2 r tokens.

    Book: eq-ch09-swap (notebooks/09_production).
    """
    for name, value in (("d", d), ("k", k)):
        _checks.check_dim(name, value)
    _checks.check_rank(r, d, k)
    return 2 * d * r * k


def model_swap_macs(config, r, target_modules):
    """``swap_macs`` summed over every adapted matrix of a model: 2 r (sum of d k) = 2 r x (adapted weights).

    Book: eq-ch09-swap (notebooks/09_production).
    """
    shapes = budget.linear_shapes(config)
    return sum(swap_macs(shapes[m].d, shapes[m].k, r) for _, m in budget.selected_linears(config, target_modules))


def _ulp(W):
    """The spacing of the floats of W's dtype at |W|, as float64: nextafter(|W|, inf) - |W|."""
    a = W.abs()
    return (torch.nextafter(a, torch.full_like(a, math.inf)) - a).double()


@torch.no_grad()
def swap_drift(W0, adapters, cycles, dtype):
    """How far the stored base moves under ``cycles`` merge/unmerge cycles in ``dtype``.

    W0: (d, k); adapters: [(A (r, k), B (d, r), s), ...], merged in turn (cycle j uses adapter
    j mod len(adapters)). The stored base is W0 rounded to dtype; cycle j computes
    W = merge(W0', A, B, s) and W0' = unmerge(W, A, B, s) in dtype (``lt.merge``, ``lt.unmerge``).
    Returns {"drift": [max |W0' - W0| after cycle 1, 2, ...], "bound": [max of the entry-wise bound
    sum over cycles of min(2 |delta_j|, ulp(W_j))], "within": every entry within its bound after
    every cycle}, all measured in float64.

    Book: prop-ch09-drift (notebooks/09_production).
    """
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
        raise ValueError(f"cycles must be a positive integer, got {cycles!r}")
    if not adapters:
        raise ValueError("swap_drift needs at least one adapter (A, B, s)")
    start = W0.to(dtype)
    # lt.merge(W0', A, B, s) is W0' + delta_w(A, B, s) and lt.unmerge subtracts the same delta_w:
    # computed once per adapter here, not twice per cycle (tests/test_serving.py checks the identity)
    deltas = [lt.delta_w(A.to(dtype), B.to(dtype), s) for A, B, s in adapters]    # the stored updates, in dtype
    current, allowed = start.clone(), torch.zeros_like(start, dtype=torch.float64)
    origin = start.double()
    drift, bound, within = [], [], True
    for j in range(cycles):
        delta = deltas[j % len(deltas)]
        W = current + delta                                                     # merge:   fl(W0' + delta)
        current = W - delta                                                     # unmerge: fl(W - delta)
        allowed += torch.minimum(2 * delta.double().abs(), _ulp(W))            # eq. (prop-ch02-roundtrip), per cycle
        err = (current.double() - origin).abs()
        within &= bool((err <= allowed).all())
        drift.append(float(err.max()))
        bound.append(float(allowed.max()))
    return {"drift": drift, "bound": bound, "within": within}


def swap_drift_bound(cycles, eps, w_max, delta_max):
    """A priori bound on max |W0' - W0| after K merge/unmerge cycles with rounding unit eps:

        D_K <= min(2 K max|delta|,  ((1 + eps)^K - 1) (max|W0| + max|delta|)).

    Book: prop-ch09-drift (notebooks/09_production).
    """
    if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 0:
        raise ValueError(f"cycles must be an integer >= 0, got {cycles!r}")
    for name, value in (("eps", eps), ("w_max", w_max), ("delta_max", delta_max)):
        _checks.check_finite_scalar(name, value)
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {name}={value}")
    return min(2 * cycles * delta_max, math.expm1(cycles * math.log1p(eps)) * (w_max + delta_max))


# --------------------------------------------------------------------------- memory


def adapters_that_fit(config, r, target_modules, memory_bytes, base_bytes_per_param=2, adapter_bytes_per_param=2,
                      reserved_bytes=0):
    """How many adapters of rank r fit in ``memory_bytes`` beside the base model's weights:

        floor((M - b_base N - reserved) / (b_adapter P)),   N = base parameters, P = one adapter's,

    0 when the base alone does not fit. ``reserved_bytes`` is what else must stay resident
    (the KV cache, activations, the runtime): the count is an upper bound on what serves.

    Book: eq-ch09-fit (notebooks/09_production).
    """
    for name, value in (("memory_bytes", memory_bytes), ("base_bytes_per_param", base_bytes_per_param),
                        ("adapter_bytes_per_param", adapter_bytes_per_param), ("reserved_bytes", reserved_bytes)):
        _checks.check_finite_scalar(name, value)
        if value < 0 or (value == 0 and name == "adapter_bytes_per_param"):
            raise ValueError(f"{name} must be {'> 0' if name == 'adapter_bytes_per_param' else '>= 0'}, got {value}")
    free = memory_bytes - base_bytes_per_param * budget.base_param_count(config) - reserved_bytes
    per_adapter = adapter_bytes_per_param * budget.lora_param_count(config, r, target_modules)
    return max(0, math.floor(free / per_adapter))


# --------------------------------------------------------------------------- combining trained adapters


def combined_model(base, paths, weights, combination_type="svd", svd_rank=None):
    """A copy of ``base`` carrying the combination of the PEFT adapters in ``paths``, as a file would:
    ``adapters.combine_adapters`` into a temporary directory, then ``adapters.load_adapter``."""
    import copy
    import os
    import tempfile

    from .adapters import combine_adapters, load_adapter

    with tempfile.TemporaryDirectory() as tmp:
        out = combine_adapters(paths, weights, os.path.join(tmp, "combined"), combination_type, svd_rank)
        return load_adapter(copy.deepcopy(base), out)
