"""LoRA in PyTorch: the same formulas as ``lora_ref.numpy``, plus a layer.

Shapes follow the LoRA paper and PEFT (and ``nn.Linear``):

    W0: (d, k)  frozen weight        A: (r, k)  trained        B: (d, r)  trained, zero at init
    x:  (..., k)                     y = x W0^T + s (x A^T) B^T,   s = alpha / r

The functions mirror ``lora_ref.numpy`` name for name and give the same numbers
(a test enforces both). ``LoRALinear``, ``add_lora`` and ``merge_lora`` put the
same math into a model, named as PEFT names things (``target_modules``,
``lora_A``, ``lora_B``, ``scaling``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import _checks, targets
from .budget import MIXED_BATCH_METHODS, materialise_crossover_tokens, mixed_batch_method
from .numpy import gaussian_a_std, kaiming_a_bound  # plain numbers: one definition for both backends

__all__ = [
    "scaling",
    "kaiming_a_bound",
    "gaussian_a_std",
    "init_lora",
    "lora_forward",
    "delta_w",
    "merge",
    "unmerge",
    "lora_grads",
    "delta_w_sgd_step",
    "pad_adapters",
    "batched_lora_forward",
    "pissa_init",
    "milora_init",
    "olora_init",
    "pissa_to_lora",
    "dora_magnitude",
    "dora_forward",
    "dora_grads",
    "vera_forward",
    "loraga_init",
    "LoRALinear",
    "add_lora",
    "replace_linears",
    "target_names",
    "merge_lora",
    "lora_modules",
    "loraplus_optimizer",
]


def _shape(t):
    return tuple(t.shape)


def _dtype(dtype):
    """'float64' or torch.float64 -> torch.float64."""
    return _checks.resolve_dtype(dtype, torch, torch.dtype)


def _check_finite(name, t):
    _checks.check_finite_count(name, int((~torch.isfinite(t)).sum()), t.shape)


def _index_range(index):
    """(holds integers, min, max) of an adapter index, for _checks.check_adapter_index."""
    integer = not (index.is_floating_point() or index.is_complex() or index.dtype == torch.bool)
    return (integer, int(index.min()), int(index.max())) if index.numel() else (integer, 0, 0)


def _zeros(like, shape):
    """Zeros of ``shape`` in the dtype and on the device of ``like``."""
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _svd(W):
    """The thin SVD W = U diag(S) Vh: U (d, p), S (p,) descending, Vh (p, k), p = min(d, k)."""
    return torch.linalg.svd(W, full_matrices=False)


def _qr(W):
    """The reduced QR decomposition W = Q R: Q (d, p), R (p, k)."""
    return torch.linalg.qr(W)


def _sqrt(a):
    return torch.sqrt(a)


def _row_norms(W):
    """||W_i,:||_2 for each row i: (d, k) -> (d,)."""
    return torch.linalg.norm(W, dim=1)


def _detach(t):
    """A constant in the backward pass."""
    return t.detach()


def _cat(parts, axis):
    return torch.cat(parts, dim=axis)


def scaling(alpha, r, rslora=False):
    """The LoRA scale s that multiplies B A.

    s = alpha / r           (LoRA, Hu et al. 2021)
    s = alpha / sqrt(r)     (rsLoRA, Kalajdzievski 2023: keeps the update's scale stable as r grows)

    Book: eq-ch02-forward (notebooks/02_forward_pass).
    """
    _checks.check_finite_scalar("alpha", alpha)
    _checks.check_rank(r)
    return alpha / math.sqrt(r) if rslora else alpha / r


def init_lora(d, k, r, seed=0, *, init="kaiming", a_std=None, b_std=None, dtype="float64"):
    """Initial factors (A, B) for a (d, k) weight.

    init="kaiming" (PEFT's default):  A_ij ~ U(-1/sqrt(k), 1/sqrt(k)),  Var = 1/(3k)
    init="gaussian" (PEFT's "gaussian"): A_ij ~ N(0, a_std^2), a_std = 1/r unless given
    B = 0 unless b_std is given, then B_ij ~ N(0, b_std^2).

    With an integer seed the draws come from ``numpy.random.default_rng(seed)``,
    exactly as in ``lora_ref.numpy``, so both backends give the same numbers.
    seed=None draws from torch's global generator (``torch.manual_seed``), as
    PEFT does. Returns A: (r, k), B: (d, r).
    """
    _checks.check_dim("d", d)
    _checks.check_dim("k", k)
    _checks.check_rank(r, d, k)
    _checks.check_init_options(init, a_std, b_std)
    dt = _dtype(dtype)
    if seed is not None:
        # One source of randomness for both backends: the NumPy draws, cast.
        from . import numpy as _np_backend

        A, B = _np_backend.init_lora(d, k, r, seed, init=init, a_std=a_std, b_std=b_std)
        return torch.from_numpy(A).to(dt), torch.from_numpy(B).to(dt)
    A = torch.empty(r, k, dtype=dt)                           # (r, k)
    if init == "kaiming":
        bound = kaiming_a_bound(k)              # 1/sqrt(k)
        nn.init.uniform_(A, -bound, bound)
    else:
        nn.init.normal_(A, 0.0, gaussian_a_std(r) if a_std is None else a_std)
    B = torch.zeros(d, r, dtype=dt)                           # (d, r)
    if b_std is not None:
        nn.init.normal_(B, 0.0, b_std)
    return A, B


def lora_forward(x, W0, A, B, scaling):
    """y = W0 x + s B (A x), through the r-dimensional bottleneck.

    x: (..., k);  W0: (d, k);  A: (r, k);  B: (d, r)  ->  y: (..., d)
    Cost per token: d k (base) + r (k + d) (bypass), never the d k r of forming B A.

    Book: eq-ch02-rows, eq-ch02-macs (notebooks/02_forward_pass).
    """
    d, r, k = _checks.check_weight_and_factors(_shape(W0), _shape(A), _shape(B))
    _checks.check_inputs(_shape(x), k)
    _checks.check_finite_scalar("scaling", scaling)
    z = x @ A.T                                   # (..., r)   z = A x, the bottleneck
    return x @ W0.T + scaling * (z @ B.T)         # (..., d)   y = W0 x + s B z


def delta_w(A, B, scaling):
    """The weight update Delta W = s B A, a (d, k) matrix of rank <= r.

    Book: eq-ch02-forward, prop-ch02-rank (notebooks/02_forward_pass).
    """
    _checks.check_factors(_shape(A), _shape(B))
    _checks.check_finite_scalar("scaling", scaling)
    return scaling * (B @ A)                      # (d, r) @ (r, k) -> (d, k)


def merge(W0, A, B, scaling):
    """W = W0 + s B A: fold the adapter into the weight (zero extra latency afterwards).

    Book: eq-ch02-merge (notebooks/02_forward_pass).
    """
    _checks.check_weight_and_factors(_shape(W0), _shape(A), _shape(B))
    for name, a in (("W0", W0), ("A", A), ("B", B)):
        _check_finite(name, a)
    return W0 + delta_w(A, B, scaling)            # (d, k)


def unmerge(W, A, B, scaling):
    """W0 = W - s B A: recover the base weight (exact in exact arithmetic).

    Book: eq-ch02-merge, prop-ch02-roundtrip (notebooks/02_forward_pass).
    """
    _checks.check_weight_and_factors(_shape(W), _shape(A), _shape(B), W_name="W")
    for name, a in (("W", W), ("A", A), ("B", B)):
        _check_finite(name, a)
    return W - delta_w(A, B, scaling)             # (d, k)


def lora_grads(x, grad_y, A, B, scaling):
    """Hand-derived gradients of a loss L through the LoRA bypass.

    Column convention (the paper's), X: (k, n), Ybar = dL/dY: (d, n), G = dL/dW = Ybar X^T: (d, k):
        dL/dB = s Ybar (A X)^T = s G A^T          (d, r)
        dL/dA = s B^T Ybar X^T = s B^T G          (r, k)
    Row convention used here, x = X^T: (n, k), g = Ybar^T: (n, d):
        dL/dB = s g^T (x A^T)        (d, n) @ (n, r)
        dL/dA = s (g B)^T x          (r, n) @ (n, k)
    At B = 0, dL/dA = 0: only B moves on the first step.
    Leading axes of x (..., k) are flattened into n.  Returns (dA, dB).

    Book: eq-ch05-grads, eq-ch05-rows (notebooks/05_gradients).
    """
    d, r, k = _checks.check_factors(_shape(A), _shape(B))
    _checks.check_inputs(_shape(x), k)
    _checks.check_grad_output(_shape(grad_y), _shape(x), d)
    _checks.check_finite_scalar("scaling", scaling)
    x2 = x.reshape(-1, k)                         # (n, k)
    g2 = grad_y.reshape(-1, d)                    # (n, d)
    z = x2 @ A.T                                  # (n, r)   z = A x
    dB = scaling * (g2.T @ z)                     # (d, r)   s Ybar (A X)^T
    dA = scaling * ((g2 @ B).T @ x2)              # (r, k)   s B^T Ybar X^T
    return dA, dB


def delta_w_sgd_step(grad_W, A, B, scaling, lr):
    """First-order change of Delta W = s B A after one SGD step of size lr on A and B.

    With G = dL/dW (d, k), the gradients are dL/dA = s B^T G and dL/dB = s G A^T, so
        Delta W' - Delta W = -lr s^2 (G A^T A + B B^T G) + lr^2 s^3 G A^T B^T G.
    Returns the first-order term  -lr s^2 (G A^T A + B B^T G), a (d, k) matrix.

    Book: eq-ch03-sgd-step (notebooks/03_scaling).
    """
    d, r, k = _checks.check_weight_and_factors(_shape(grad_W), _shape(A), _shape(B), W_name="grad_W")
    _checks.check_finite_scalar("scaling", scaling)
    _checks.check_finite_scalar("lr", lr)
    from_A = (grad_W @ A.T) @ A                   # (d, r) @ (r, k) -> (d, k)   G A^T A: A moves, B fixed
    from_B = B @ (B.T @ grad_W)                   # (d, r) @ (r, k) -> (d, k)   B B^T G: B moves, A fixed
    return -lr * scaling**2 * (from_A + from_B)   # (d, k)


# --------------------------------------------------------------------------- layer

# LoRALinear forms W0 + s B A for a batch (no gradients needed) once it has more than this many times
# T* = d k / (d + k) rows: above T* forming B A costs fewer multiply-adds than the bypass (chapter 02),
# but it also writes and reads a (d, k) matrix, so the time crossover comes later. Measured with
# benchmarks/bench_lora_linear.py --crossover, fp32 on 2 cores, r = 8 and 64: at d = k = 1024 and 2048
# the bypass wins up to about 2 T* and materialising by 2-13 % from 3 T* on; at d = k = 4096 the bypass
# is already within 4 % of the base layer and the two forms stay within 5 % of each other up to 6 T*.
MATERIALISE_AT = 2.0


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` (W0, bias) plus a trainable low-rank bypass.

        y = base(x) + s * B (A dropout(x)),     s = alpha / r  (alpha / sqrt(r) with rslora)

    ``lora_A`` is A: (r, k) and ``lora_B`` is B: (d, r), held as parameters, so the
    bypass is two thin matmuls and B A is never formed. After ``merge()`` the
    bypass is folded into ``base_layer.weight`` and the layer costs exactly what
    the base layer costs; ``unmerge()`` restores W0.

    A is initialised as in PEFT (kaiming_uniform(a=sqrt(5)), i.e. U(-1/sqrt(k), 1/sqrt(k)),
    or "gaussian" with std 1/r), from torch's global generator; B = 0.
    """

    def __init__(self, base_layer, r, alpha, dropout=0.0, rslora=False, init="kaiming"):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        d, k = base_layer.out_features, base_layer.in_features
        _checks.check_rank(r, d, k)
        _checks.check_finite_scalar("alpha", alpha)
        _checks.check_finite_scalar("dropout", dropout)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={dropout}")
        self.base_layer = base_layer
        self.r, self.alpha, self.rslora = r, alpha, rslora
        self.scaling = scaling(alpha, r, rslora)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        W0 = base_layer.weight
        A, B = init_lora(d, k, r, seed=None, init=init, dtype=W0.dtype)
        self.lora_A = nn.Parameter(A.to(W0.device))            # (r, k)
        self.lora_B = nn.Parameter(B.to(W0.device))            # (d, r)
        self.merged = False
        for p in self.base_layer.parameters():
            p.requires_grad_(False)

    @property
    def in_features(self):
        return self.base_layer.in_features

    @property
    def out_features(self):
        return self.base_layer.out_features

    def forward(self, x):
        if self.merged:
            return self.base_layer(x)                           # W already holds W0 + s B A
        if not isinstance(self.base_layer, nn.Linear):          # e.g. QLoRA's NF4 base: W0 is not a tensor here
            return self._bypass_added(x, self.base_layer(x))
        x2 = x.reshape(-1, self.in_features)                    # (n, k), n = tokens
        if self._materialises(x2):
            return F.linear(x, self._merged_weight(), self.base_layer.bias)     # x (W0 + s B A)^T + bias
        return self._bypass_added(x, self.base_layer(x))

    def _materialises(self, x2):
        """Form W0 + s B A for this batch instead of running the bypass: cheaper in multiply-adds
        once n > T* = d k / (d + k) (eq-ch02-crossover), and in time once n > MATERIALISE_AT * T*.
        Only where nothing needs the bypass's own gradients and dropout is off (it acts on x inside
        the bypass only), and in float32 or float64: in bf16 or fp16, W0 + s B A rounded to 8 or 11
        bits would lose most of s B A (far smaller than W0's entries), and the output would no longer
        be the unmerged layer's, which PEFT computes."""
        if torch.is_grad_enabled() and (x2.requires_grad or any(p.requires_grad for p in self.parameters())):
            return False                                        # gradients keep the bypass's own numbers
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            return False
        if self.base_layer.weight.dtype not in (torch.float32, torch.float64):
            return False
        return x2.shape[0] > MATERIALISE_AT * materialise_crossover_tokens(self.out_features, self.in_features)

    def _merged_weight(self):
        """W0 + s B A for one batch: eq-ch02-merge without ``merge``'s scan of W0, A and B for
        non-finite values, which would cost a pass over W0 on every forward."""
        W0, A, B = self.base_layer.weight, self.lora_A, self.lora_B
        return torch.addmm(W0, B.to(W0.dtype), A.to(W0.dtype), alpha=self.scaling)   # (d, k)  W0 + s B A

    def _bypass_added(self, x, y):
        """y + s B (A dropout(x)) for a base output y (..., d): one GEMM that accumulates into y."""
        z = self.lora_dropout(x) @ self.lora_A.T                # (..., r)   z = A x
        y2, z2 = y.reshape(-1, y.shape[-1]), z.reshape(-1, self.r)        # (n, d), (n, r)
        if torch.is_grad_enabled():
            return torch.addmm(y2, z2, self.lora_B.T, alpha=self.scaling).view(y.shape)
        return y2.addmm_(z2, self.lora_B.T, alpha=self.scaling).view(y.shape)

    @torch.no_grad()
    def merge(self):
        """W <- W0 + s B A in place; the bypass is switched off."""
        if not self.merged:
            W0 = self.base_layer.weight
            W0.copy_(merge(W0, self.lora_A.to(W0.dtype), self.lora_B.to(W0.dtype), self.scaling))
            self.merged = True
        return self

    @torch.no_grad()
    def unmerge(self):
        """W0 <- W - s B A in place; the bypass is switched back on."""
        if self.merged:
            W = self.base_layer.weight
            W.copy_(unmerge(W, self.lora_A.to(W.dtype), self.lora_B.to(W.dtype), self.scaling))
            self.merged = False
        return self

    def extra_repr(self):
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, rslora={self.rslora}, merged={self.merged}"


def target_names(model, target_modules):
    """The names of the nn.Linear modules that ``target_modules`` selects, in model order.

    PEFT's rule (``lora_ref.targets``): a list matches names by equality or suffix, a string
    is a regex full match, "all-linear" is every linear layer but the output layer. The
    base_layer inside a LoRALinear is not a candidate: a layer is adapted once.
    """
    wrapped = {n + ".base_layer" if n else "base_layer" for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in wrapped]
    return targets.select(linears, target_modules, output_layers=targets.output_layer_names(model))


def add_lora(model, target_modules, r, alpha, dropout=0.0, rslora=False, init="kaiming"):
    """Replace each nn.Linear whose name ends in one of ``target_modules`` by a LoRALinear.

    ``target_modules`` follows PEFT (see ``lora_ref.targets``): a list of names or name
    suffixes (``["q_proj", "v_proj"]``), a regex that must match the whole name, "all-linear"
    (every nn.Linear but the output layer), or a named set ("qv", "attention"). Every parameter of the
    model is frozen except the new A and B (and those of LoRA layers already there).
    The model is changed in place and returned.
    """
    _checks.check_finite_scalar("alpha", alpha)
    return replace_linears(model, target_modules, r,
                           lambda linear: LoRALinear(linear, r, alpha, dropout, rslora, init))


def replace_linears(model, target_modules, r, make_layer):
    """Swap the targeted nn.Linear layers for ``make_layer(linear)``, a LoRA layer of rank r.

    r is checked against every target before anything changes, so a failure leaves the
    model as it was. All parameters are frozen except the LoRA factors (old and new).
    """
    _checks.check_rank(r)
    names = target_names(model, target_modules)
    for name in names:                                          # validate every r first:
        lin = model.get_submodule(name)                         # nothing is replaced if one fails
        _checks.check_rank(r, lin.out_features, lin.in_features)
    existing = {id(p) for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)}
    for p in model.parameters():                                # freeze all but the adapters
        p.requires_grad_(id(p) in existing and p.requires_grad)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make_layer(getattr(parent, child)))
    return model


def lora_modules(model):
    """{name: LoRALinear} for every LoRA layer in the model, in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(model):
    """Fold every adapter into its base weight and put the plain nn.Linear back.

    The returned model has the original architecture and no LoRA modules, like
    PEFT's ``merge_and_unload()``; its outputs equal the adapted model's.
    """
    for name, module in lora_modules(model).items():
        module.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.base_layer)
    return model


# --------------------------------------------------------------------------- LoRA+

_EIGHT_BIT_OPTIMIZERS = ("Adam8bit", "AdamW8bit", "PagedAdam8bit", "PagedAdamW8bit")


def loraplus_optimizer(model, optimizer_cls, lr, loraplus_lr_ratio, **kwargs):
    """LoRA+ (Hayou et al. 2024): an optimizer whose B factors learn ``loraplus_lr_ratio`` times faster
    than their A factors, eta_B = lambda eta_A, over exactly the model's trainable parameters.

    The groups are those of PEFT 0.21's ``peft.optimizers.create_loraplus_optimizer``, in its order:
        A:             every other trainable parameter (every lora_A)  lr           loraplus_weight_decay
        B:             name contains "lora_B", or 1-D (as PEFT does)    lr * ratio   loraplus_weight_decay
        B, no decay:   those B whose name has "bias" or that sit in    lr * ratio   0
                       an nn.LayerNorm (transformers' decay rule)
    ``loraplus_weight_decay`` (default 0) and the other ``kwargs`` go to ``optimizer_cls``; for
    bitsandbytes' 8-bit Adam variants every nn.Embedding keeps 32-bit state, as in PEFT.

    What differs from PEFT: ``weight_decay=`` is refused with a message (PEFT passes it on, and
    every group then overrides it with loraplus_weight_decay, so it is silently ignored);
    lora_ref has no LoRA embedding layer, so there is no embedding group and
    ``loraplus_lr_embedding`` is accepted but has nothing to act on; a model with no trainable
    lora_B is refused (PEFT would put everything in A's group and build plain SGD/Adam).

    Book: eq-ch05-loraplus (notebooks/05_gradients).
    """
    _checks.check_finite_scalar("lr", lr)
    _checks.check_finite_scalar("loraplus_lr_ratio", loraplus_lr_ratio)
    if lr <= 0 or loraplus_lr_ratio <= 0:
        raise ValueError(f"lr and loraplus_lr_ratio must be > 0, got lr={lr}, loraplus_lr_ratio={loraplus_lr_ratio}")
    if "weight_decay" in kwargs:
        raise ValueError(f"weight_decay={kwargs['weight_decay']} would be overridden by every LoRA+ group "
                         f"(PEFT ignores it silently); pass loraplus_weight_decay={kwargs['weight_decay']}")
    weight_decay = kwargs.pop("loraplus_weight_decay", 0.0)
    kwargs.pop("loraplus_lr_embedding", None)                   # no LoRA embedding layers here
    in_layernorm = {f"{m_name}.{p_name}" if m_name else p_name
                    for m_name, m in model.named_modules() if isinstance(m, nn.LayerNorm)
                    for p_name, _ in m.named_parameters()}
    groups = {"A": [], "B": [], "B_no_decay": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in name or p.ndim == 1:
            groups["B_no_decay" if "bias" in name or name in in_layernorm else "B"].append((name, p))
        else:
            groups["A"].append((name, p))
    if not any("lora_B" in name for name, _ in groups["B"] + groups["B_no_decay"]):
        raise ValueError("the model has no trainable lora_B: add LoRA layers (add_lora) before building LoRA+")
    optimizer = optimizer_cls([
        {"params": [p for _, p in groups["A"]], "weight_decay": weight_decay, "lr": lr},
        {"params": [p for _, p in groups["B"]], "weight_decay": weight_decay, "lr": lr * loraplus_lr_ratio},
        {"params": [p for _, p in groups["B_no_decay"]], "weight_decay": 0.0, "lr": lr * loraplus_lr_ratio},
    ], lr=lr, **kwargs)
    if optimizer_cls.__name__ in _EIGHT_BIT_OPTIMIZERS:
        import bitsandbytes

        manager = bitsandbytes.optim.GlobalOptimManager.get_instance()
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                manager.register_module_override(module, "weight", {"optim_bits": 32})
    return optimizer


# --------------------------------------------------------------------------- many adapters in one batch


def pad_adapters(As, Bs, r=None):
    """Stack adapters of ranks r_1 .. r_m for one weight, zero-padded to a common rank r.

    As: m factors A_j (r_j, k);  Bs: m factors B_j (d, r_j)  ->  A: (m, r, k), B: (m, d, r),
    r = max r_j unless given. Padding changes no product:
        [B_j 0] [A_j; 0] = B_j A_j,
    the extra rows of A_j and columns of B_j only ever meet zeros.

    Book: eq-ch09-padding (notebooks/09_production).
    """
    ranks, d, k = _checks.check_adapter_list([_shape(A) for A in As], [_shape(B) for B in Bs], r)
    r = max(ranks) if r is None else r
    A_pad = _zeros(As[0], (len(As), r, k))                  # (m, r, k)
    B_pad = _zeros(Bs[0], (len(Bs), d, r))                  # (m, d, r)
    for j, (A, B) in enumerate(zip(As, Bs)):
        A_pad[j, : A.shape[0]] = A                          # rows r_j .. r of A_j stay 0
        B_pad[j, :, : B.shape[1]] = B                       # columns r_j .. r of B_j stay 0
    return A_pad, B_pad


def _adapter_counts(index, m):
    """Rows per adapter, a list of m ints (rows with index -1 are the base model's)."""
    return torch.bincount(index + 1, minlength=m + 1)[1:].tolist()


def _in_order(index):
    """Whether the rows are already sorted by adapter, base rows (-1) first."""
    return index.numel() < 2 or bool((index[1:] >= index[:-1]).all())


def _rows_by_adapter(index):
    """(order, sorted): a stable permutation putting the rows in adapter order, base rows (-1)
    first, and whether the index was in that order already (then no permutation is needed)."""
    already = _in_order(index)
    return (None if already else torch.argsort(index, stable=True)), already


def _mixed_gathered(x, W0, As, Bs, scalings, index, counts):
    on = index >= 0                               # (n,)   rows served by an adapter
    a = index * on                                # (n,)   their adapter; 0 for base rows, masked below
    z = (As[a] @ x[:, :, None])[:, :, 0]          # (n, r)   shrink: z_i = A_a x_i, A_a gathered per row
    up = (Bs[a] @ z[:, :, None])[:, :, 0]         # (n, d)   expand: B_a z_i
    return x @ W0.T + (scalings[a] * on)[:, None] * up      # (n, d)   W0 x_i + s_a B_a z_i


def _mixed_segmented(x, W0, As, Bs, scalings, index, counts):
    order, already = _rows_by_adapter(index)
    xs = x if already else x[order]               # (n, k)   rows sorted by adapter, base rows first
    ys = xs @ W0.T                                # (n, d)   W0 x_i, one GEMM
    lo = xs.shape[0] - sum(counts)                # the first adapter row
    for j, c in enumerate(counts):
        if c:                                     # rows lo .. lo + c use adapter j: one GEMM pair, in place
            ys[lo:lo + c].addmm_(xs[lo:lo + c] @ As[j].T, Bs[j].T, alpha=float(scalings[j]))
        lo += c
    if already:
        return ys
    y = torch.empty_like(ys)
    y[order] = ys                                 # back to the caller's order
    return y


def _mixed_padded(x, W0, As, Bs, scalings, index, counts):
    used = [j for j, c in enumerate(counts) if c]
    if not used:
        return x @ W0.T
    slot = torch.full((len(counts),), -1, dtype=torch.long, device=x.device)
    slot[used] = torch.arange(len(used), device=x.device)              # adapter j -> its segment
    rows = (index >= 0).nonzero()[:, 0]           # (n_on,)  rows served by an adapter, in order
    seg = slot[index[rows]]                       # (n_on,)  their segment
    order = torch.argsort(seg, stable=True)
    rows, seg = rows[order], seg[order]           # sorted by segment
    starts = torch.tensor([0] + [counts[j] for j in used[:-1]], device=x.device).cumsum(0)
    pos = torch.arange(rows.shape[0], device=x.device) - starts[seg]   # place within the segment
    L = max(counts)
    Xp = x.new_zeros(len(used), L, x.shape[1])    # (u, L, k)  each adapter's rows, zero-padded
    Xp[seg, pos] = x[rows]
    Z = torch.bmm(Xp, As[used].transpose(1, 2))  # (u, L, r)  shrink, one grouped GEMM
    Z = Z * scalings[used][:, None, None]
    U = torch.bmm(Z, Bs[used].transpose(1, 2))   # (u, L, d)  expand
    y = x @ W0.T                                  # (n, d)
    y[rows] += U[seg, pos]                        # rows are distinct: a plain indexed add
    return y


def _mixed_stacked(x, W0, As, Bs, scalings, index, counts):
    m, r, k = As.shape
    d = Bs.shape[1]
    Z = (x @ As.reshape(m * r, k).T).view(-1, m, r)            # (n, m, r)  A_j x_i for every j
    keep = (torch.arange(m, device=x.device)[None, :] == index[:, None]).to(x.dtype)   # (n, m) one-hot, base rows 0
    Z = Z * (keep * scalings[None, :])[:, :, None]             # (n, m, r)  only s_a A_a x_i survives
    B_all = Bs.permute(1, 0, 2).reshape(d, m * r)              # (d, m r)   [B_0 ... B_{m-1}]
    return torch.addmm(x @ W0.T, Z.view(-1, m * r), B_all.T)   # (n, d)


_MIXED_BATCH = {"gathered": _mixed_gathered, "segmented": _mixed_segmented, "padded": _mixed_padded,
                "stacked": _mixed_stacked}


def batched_lora_forward(x, W0, As, Bs, scalings, index, method="auto"):
    """A mixed batch: row i through its own adapter a = index[i] (or none when a = -1).

        y_i = W0 x_i + s_a B_a (A_a x_i),   and  y_i = W0 x_i  when a = -1

    x: (n, k);  W0: (d, k);  As: (m, r, k);  Bs: (m, d, r);  scalings: (m,);
    index: (n,) integers in [-1, m)  ->  y: (n, d).
    One product x W0^T for the whole batch; the bypasses by one of four formulations, the same
    numbers to rounding (``method``, the names of budget.MIXED_BATCH_METHODS):

      "gathered"   copy A_a and B_a for every row, (n, r, k) and (n, d, r), then two batched
                   matrix-vector products, "shrink" z_i = A_a x_i and "expand" B_a z_i (Punica's
                   BGMV without its kernel, which reads A_a and B_a in place)
      "segmented"  sort the rows by adapter; one GEMM pair per adapter on its contiguous rows
                   (S-LoRA's and Punica's SGMV, as a loop over the adapters)
      "padded"     each adapter's rows padded to the longest segment L: two grouped products,
                   (u, L, k) x (u, k, r) and (u, L, r) x (u, r, d), for the u adapters in use
      "stacked"    x times all m A's at once, (n, m r); each row keeps its own block of r, then
                   times all m B's: one GEMM pair, m times the multiply-adds
      "auto"       the cheapest for this shape by budget.mixed_batch_costs

    Adapters of lower rank are padded with ``pad_adapters``.

    Book: eq-ch09-batched (notebooks/09_production).
    """
    n, d, r, k, m = _checks.check_batched_lora(_shape(x), _shape(W0), _shape(As), _shape(Bs), _shape(scalings),
                                               _shape(index))
    _checks.check_adapter_index(*_index_range(index), m)
    _checks.check_choice("method", method, ("auto",) + MIXED_BATCH_METHODS)
    counts = _adapter_counts(index, m)            # m ints: rows per adapter
    if method == "auto":
        method = mixed_batch_method(counts, d, k, r, in_order=_in_order(index))
    return _MIXED_BATCH[method](x, W0, As, Bs, scalings, index, counts)


# --------------------------------------------------------------------------- variants of LoRA


def _balanced_factors(W0, U, S, Vh, scaling):
    """(A, B, W_res) from r singular triplets (U, S, Vh) of W0, the factors of PiSSA and MiLoRA.

    Each factor carries half of the spectrum, B = U sqrt(S / s) and A = sqrt(S / s) Vh, so that
    s B A = U diag(S) Vh; W_res = W0 - s B A keeps the other triplets, and W_res + s B A = W0.
    """
    root = _sqrt(S / scaling)                     # (r,)     sqrt(S_r / s)
    B = U * root[None, :]                         # (d, r)   U_r diag(sqrt(S_r / s))
    A = root[:, None] * Vh                        # (r, k)   diag(sqrt(S_r / s)) V_r^T
    return A, B, W0 - (scaling * B) @ A           # (d, k)   W_res = W0 - s B A, in PEFT's order


def pissa_init(W0, r, scaling):
    """PiSSA (Meng et al. 2024): the adapter starts as the top r singular triplets of W0.

        W0 = U S V^T,   s B A = U_r S_r V_r^T,   W_res = W0 - s B A = sum_{i > r} sigma_i u_i v_i^T
    B = U_r sqrt(S_r / s): (d, r) and A = sqrt(S_r / s) V_r^T: (r, k) share S_r evenly, and the
    frozen base becomes W_res: (d, k). s B A is the best rank-r approximation of W0
    (Eckart-Young), so W_res is the smallest residual any rank-r adapter can leave:
    ||W_res||_F^2 = sum_{i > r} sigma_i^2. PEFT: ``LoraConfig(init_lora_weights="pissa")``.
    Returns (A, B, W_res); the signs of matching columns of U and rows of V^T are free.

    Book: eq-ch10-pissa, prop-ch10-residual (notebooks/10_variants).
    """
    d, k = _checks.check_weight(_shape(W0))
    _checks.check_rank(r, d, k)
    _checks.check_positive_scaling(scaling)
    _check_finite("W0", W0)
    U, S, Vh = _svd(W0)                           # (d, p), (p,), (p, k), p = min(d, k), S descending
    return _balanced_factors(W0, U[:, :r], S[:r], Vh[:r], scaling)


def milora_init(W0, r, scaling):
    """MiLoRA (Wang et al. 2024): PiSSA with the r smallest singular triplets of W0.

        s B A = U_[p-r:] S_[p-r:] V_[p-r:]^T,   W_res = sum_{i <= p - r} sigma_i u_i v_i^T,  p = min(d, k)
    The adapter takes the minor directions and W_res keeps the principal ones, so
    ||W_res||_F^2 = sum_{i <= p - r} sigma_i^2, the largest residual of any r triplets.
    Not in PEFT; the factors are those of ``pissa_init`` at the other end of the spectrum.
    Returns (A, B, W_res).

    Book: eq-ch10-pissa, prop-ch10-residual (notebooks/10_variants).
    """
    d, k = _checks.check_weight(_shape(W0))
    _checks.check_rank(r, d, k)
    _checks.check_positive_scaling(scaling)
    _check_finite("W0", W0)
    U, S, Vh = _svd(W0)                           # S descending: the last r are the smallest
    p = S.shape[0]
    return _balanced_factors(W0, U[:, p - r:], S[p - r:], Vh[p - r:], scaling)


def olora_init(W0, r, scaling):
    """OLoRA (Buyukakyuz 2024): the adapter starts from the QR decomposition of W0.

        W0 = Q R,   B = Q[:, :r] (d, r) orthonormal columns,   A = R[:r] (r, k),   W_res = W0 - s B A
    No scaling is divided out, so s B A = s Q_r R_r: the first r rows of R, scaled by s.
    PEFT: ``LoraConfig(init_lora_weights="olora")``. Returns (A, B, W_res); a column of Q and
    the matching row of R may both change sign.

    Book: prop-ch10-residual (notebooks/10_variants).
    """
    d, k = _checks.check_weight(_shape(W0))
    _checks.check_rank(r, d, k)
    _checks.check_finite_scalar("scaling", scaling)
    _check_finite("W0", W0)
    Q, R = _qr(W0)                                # (d, p), (p, k), p = min(d, k)
    B, A = Q[:, :r], R[:r]                        # (d, r), (r, k)
    return A, B, W0 - (scaling * B) @ A           # (d, k)


def pissa_to_lora(A, B, A0, B0):
    """A PiSSA (or OLoRA) adapter as a plain LoRA adapter on the original W0.

    Training moved (A0, B0) to (A, B) on the base W_res = W0 - s B0 A0, so the model holds
        W_res + s B A = W0 + s (B A - B0 A0) = W0 + s [B, -B0] [A; A0].
    The converted factors A' = [A; A0]: (2r, k) and B' = [B, -B0]: (d, 2r) apply to W0 itself at
    the same s. PEFT: ``save_pretrained(..., path_initial_model_for_weight_conversion=...)``,
    which saves r' = 2 r and alpha' = 2 alpha (alpha sqrt(2) with rsLoRA) to keep s.
    Returns (A', B').

    Book: prop-ch10-conversion (notebooks/10_variants).
    """
    d, r, k = _checks.check_factors(_shape(A), _shape(B))
    d0, r0, k0 = _checks.check_factors(_shape(A0), _shape(B0))
    if (d0, r0, k0) != (d, r, k):
        raise ValueError(f"the initial factors A0 {_shape(A0)}, B0 {_shape(B0)} must have the shapes of the "
                         f"trained A {_shape(A)}, B {_shape(B)}")
    return _cat([A, A0], 0), _cat([B, -B0], 1)    # (2r, k), (d, 2r)


def dora_magnitude(W):
    """DoRA's magnitude m: the norm of each output row of W, (d, k) -> (d,).

        m_i = ||W_i,:||_2
    PEFT starts m at dora_magnitude(W0 + s B A) (= the row norms of W0, since B = 0 at init) and
    trains it; the direction (W0 + s B A) / ||W0 + s B A||_row is trained through B and A.

    Book: eq-ch10-dora, prop-ch10-dora (notebooks/10_variants).
    """
    d, _ = _checks.check_weight(_shape(W), name="W")
    _check_finite("W", W)
    return _row_norms(W)                          # (d,)


def dora_forward(x, W0, A, B, m, scaling):
    """DoRA (Liu et al. 2024): a trained magnitude m times a LoRA-adapted direction.

        W' = diag(m / ||W||_row) W,   W = W0 + s B A,   y = x W'^T
    x: (..., k);  W0: (d, k);  A: (r, k);  B: (d, r);  m: (d,)  ->  y: (..., d).
    The row norm ||W||_row is a constant in the backward pass (DoRA section 4.3, as PEFT does):
    in the torch backend it is detached, so gradients flow to m, A and B through W only.

    Book: eq-ch10-dora (notebooks/10_variants).
    """
    d, r, k = _checks.check_weight_and_factors(_shape(W0), _shape(A), _shape(B))
    _checks.check_inputs(_shape(x), k)
    _checks.check_vector("m", _shape(m), d, "one magnitude per output row of W0 (d, k)")
    _checks.check_finite_scalar("scaling", scaling)
    W = W0 + scaling * (B @ A)                    # (d, k)   the adapted direction, unnormalised
    norm = _detach(_row_norms(W))                 # (d,)     ||W_i,:||, no gradient (DoRA 4.3)
    _checks.check_no_zero_rows(int((norm == 0).sum()), d)
    return (m / norm) * (x @ W.T)                 # (..., d)  diag(m / ||W||) W x


def dora_grads(x, grad_y, W0, A, B, m, scaling, detach_norm=True):
    """Hand-derived gradients of a loss L through ``dora_forward``: (dA, dB, dm).

    With W = W0 + s B A, n = ||W||_row, c = m / n and G = grad_y^T x (d, k), the gradient of
    L with respect to DoRA's weight W' = diag(c) W:
        dL/dm_i = <G_i, W_i> / n_i                                        (d,)
        dL/dW   = diag(c) G                              (norm detached, DoRA section 4.3)
        dL/dW   = diag(c) (G - diag(<G_i, W_i> / n_i^2) W)   (norm differentiated: the extra term
                                                          removes the part of G along each row W_i)
        dL/dB   = s dL/dW A^T  (d, r),    dL/dA = s B^T dL/dW  (r, k).
    detach_norm=True gives PEFT's gradients; False, those of the formula with nothing detached.

    Book: eq-ch10-dora-grads (notebooks/10_variants).
    """
    d, r, k = _checks.check_weight_and_factors(_shape(W0), _shape(A), _shape(B))
    _checks.check_inputs(_shape(x), k)
    _checks.check_grad_output(_shape(grad_y), _shape(x), d)
    _checks.check_vector("m", _shape(m), d, "one magnitude per output row of W0 (d, k)")
    _checks.check_finite_scalar("scaling", scaling)
    W = W0 + scaling * (B @ A)                    # (d, k)
    norm = _row_norms(W)                          # (d,)
    _checks.check_no_zero_rows(int((norm == 0).sum()), d)
    G = grad_y.reshape(-1, d).T @ x.reshape(-1, k)  # (d, k)   dL/dW' = Ybar X^T
    along = (G * W).sum(1)                        # (d,)     <G_i, W_i>
    dm = along / norm                             # (d,)
    dW = (m / norm)[:, None] * G                  # (d, k)   norm held constant
    if not detach_norm:
        dW = dW - (m * along / norm**3)[:, None] * W   # minus the component along each row W_i
    return scaling * (B.T @ dW), scaling * (dW @ A.T), dm   # (r, k), (d, r), (d,)


def vera_forward(x, W0, A, B, d_vec, b_vec):
    """VeRA (Kopiczko et al. 2024): frozen random A and B shared by every layer, two trained vectors.

        y = W0 x + Lambda_b B Lambda_d A x,    Lambda_d = diag(d_vec) (r,),  Lambda_b = diag(b_vec) (d,)
    x: (..., k);  W0: (d, k);  A: (r, k);  B: (d, r)  ->  y: (..., d).  A layer trains r + d
    numbers against LoRA's r (d + k). PEFT slices one shared (r, k_max) A and (d_max, r) B to each
    layer's (r, k) and (d, r), and starts b_vec at 0 and d_vec at ``d_initial`` (0.1).

    Book: eq-ch10-vera (notebooks/10_variants).
    """
    d, r, k = _checks.check_weight_and_factors(_shape(W0), _shape(A), _shape(B))
    _checks.check_inputs(_shape(x), k)
    _checks.check_vector("d_vec", _shape(d_vec), r, "one scale per rank, the diagonal of Lambda_d")
    _checks.check_vector("b_vec", _shape(b_vec), d, "one scale per output row, the diagonal of Lambda_b")
    z = d_vec * (x @ A.T)                         # (..., r)   Lambda_d A x
    return x @ W0.T + b_vec * (z @ B.T)           # (..., d)   W0 x + Lambda_b B z


def loraga_init(W0, grad_W, r, scaling, stable_gamma=16):
    """LoRA-GA (Wang et al. 2024): the adapter starts from the SVD of the first gradient G = dL/dW0.

        G = U S V^T,   A = V_[:r]^T (r, k),   B = U_[r:2r] diag(S_[r:2r]) d^(1/4) / sqrt(gamma) (d, r)
        W_res = W0 - s B A
    as PEFT 0.21.2 computes it with its defaults (direction "ArB2r", scale "stable", gamma = 16),
    but with the exact SVD where PEFT calls ``svd_lowrank(q=min(4r, d, k), niter=4)``. Both factors
    lie in the top-2r singular subspaces of G, so the first step of A and B moves Delta W inside
    them. Returns (A, B, W_res).

    Book: prop-ch10-loraga (notebooks/10_variants).
    """
    d, k = _checks.check_weight(_shape(W0))
    if _shape(grad_W) != (d, k):
        raise ValueError(f"grad_W is {_shape(grad_W)} but W0 is {(d, k)}: the gradient has the shape of the weight")
    _checks.check_double_rank(r, d, k)
    _checks.check_finite_scalar("scaling", scaling)
    _checks.check_finite_scalar("stable_gamma", stable_gamma)
    _check_finite("grad_W", grad_W)
    U, S, Vh = _svd(grad_W)                       # (d, p), (p,), (p, k)
    A = Vh[:r]                                    # (r, k)   top r right singular vectors
    B = U[:, r:2 * r] * S[None, r:2 * r]          # (d, r)   the next r left ones, times their sigma
    B = B * (d**0.25 / stable_gamma**0.5)         # (d, r)   PEFT's scale="stable"
    return A, B, W0 - scaling * (B @ A)           # (d, k)   in PEFT's order
