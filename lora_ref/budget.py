"""Parameter counts and memory budgets, computed from a model's config.

A decoder-only transformer in the Llama family (Llama, Mistral, Qwen2) has, per layer,
seven linear maps, named as in Hugging Face transformers and PEFT:

    attention:  q_proj  hidden -> n_heads    * head_dim
                k_proj  hidden -> n_kv_heads * head_dim     (grouped-query attention:
                v_proj  hidden -> n_kv_heads * head_dim      n_kv_heads <= n_heads)
                o_proj  n_heads * head_dim -> hidden
    MLP:        gate_proj, up_proj  hidden -> intermediate,   down_proj  intermediate -> hidden

LoRA on a weight W0: (d, k) = (out, in) trains A: (r, k) and B: (d, r), so it adds

    r (d + k)  parameters per adapted matrix,  and  n_layers * sum_targets r (d + k)  in all.

Memory estimates count weights, gradients and optimizer state only; activations
(which grow with batch size and sequence length) are excluded everywhere.

This module uses only the standard library: it never imports numpy or torch.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import types
from collections.abc import Mapping
from importlib import resources
from typing import NamedTuple

from . import _checks
from . import targets as _targets
from .targets import LINEAR_MODULES

__all__ = [
    "LINEAR_MODULES", "BYTES_PER_PARAM", "MemoryEstimate", "LinearShape",
    "available_configs", "load_config", "linear_shapes", "resolve_targets", "selected_linears",
    "lora_param_count", "module_subsets", "CountMatch", "search_lora_counts",
    "decoder_linear_param_count", "base_param_breakdown", "base_param_count", "adapter_bytes",
    "nf4_bits_per_param", "OPTIMIZER_SCHEMES", "bytes_per_param", "full_finetune_memory",
    "lora_memory", "qlora_memory",
    "forward_macs", "materialise_crossover_tokens",
    "MIXED_BATCH_METHODS", "MIXED_BATCH_CONSTANTS", "mixed_batch_terms", "mixed_batch_costs", "mixed_batch_method",
]

# Where the seven linear layers sit in decoder layer i of a Hugging Face Llama, Mistral or
# Qwen2: the names that target_modules is matched against (lora_ref.targets, PEFT's rule).
def _full_name(i, m):
    return f"model.layers.{i}.{'self_attn' if m in _targets.NAMED_SETS['attention'] else 'mlp'}.{m}"


_LAYER_NAMES = {m: _full_name(0, m) for m in LINEAR_MODULES}

# Bytes per stored number, by dtype.
BYTES_PER_PARAM = {"fp32": 4, "bf16": 2}

# bitsandbytes' 8-bit optimizers store each state as 1-byte codes plus one fp32 absmax per
# block of 256 entries (bitsandbytes/optim/optimizer.py, Optimizer2State.init_state).
_BNB_STATE_BLOCKSIZE = 256

# Training state per parameter, in bytes, by component, for the usual ways to run Adam.
# Activations are not included. "mixed-precision Adam" is the book's default (16 bytes).
OPTIMIZER_SCHEMES = {
    # everything in fp32, no mixed precision
    "fp32 Adam": {
        "weights (fp32)": 4, "gradients (fp32)": 4, "Adam m (fp32)": 4, "Adam v (fp32)": 4,
    },
    # Micikevicius et al. 2018; the "2 + 2 + 12" of ZeRO (Rajbhandari et al. 2020, Sec. 3.1)
    "mixed-precision Adam": {
        "weights (bf16)": 2, "gradients (bf16)": 2, "fp32 master weights": 4,
        "Adam m (fp32)": 4, "Adam v (fp32)": 4,
    },
    # bf16 weights updated in place, fp32 moments, no master copy
    "bf16 weights, fp32 Adam, no master": {
        "weights (bf16)": 2, "gradients (bf16)": 2, "Adam m (fp32)": 4, "Adam v (fp32)": 4,
    },
    # mixed precision with bitsandbytes' 8-bit Adam: m and v as 1-byte codes + absmax
    "mixed-precision 8-bit Adam": {
        "weights (bf16)": 2, "gradients (bf16)": 2, "fp32 master weights": 4,
        "Adam m, v (8-bit codes)": 2, "8-bit state absmax (fp32 per 256)": 2 * 4 / _BNB_STATE_BLOCKSIZE,
    },
    # everything in bf16 (torch.optim.Adam keeps m, v in the parameter's dtype)
    "pure bf16 Adam": {
        "weights (bf16)": 2, "gradients (bf16)": 2, "Adam m (bf16)": 2, "Adam v (bf16)": 2,
    },
    # bf16 weights updated in place with bitsandbytes' 8-bit Adam, no master copy
    "bf16 weights, 8-bit Adam, no master": {
        "weights (bf16)": 2, "gradients (bf16)": 2,
        "Adam m, v (8-bit codes)": 2, "8-bit state absmax (fp32 per 256)": 2 * 4 / _BNB_STATE_BLOCKSIZE,
    },
}



# ----------------------------------------------------------------------------- configs

def _config_dir():
    """lora_ref/configs/, shipped as package data (pyproject.toml: configs/*.json)."""
    return resources.files("lora_ref").joinpath("configs")


def available_configs():
    """Names of the shipped configs, e.g. ['llama-3.1-70b', 'llama-3.1-8b', ...]."""
    files = _config_dir().iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_config(name):
    """A shipped config as a dict: the public config.json, reduced to the architecture keys.

    ``_source`` holds the Hugging Face hub repo it comes from, e.g. "meta-llama/Llama-3.1-8B".
    """
    names = available_configs()
    if name not in names:
        raise ValueError(f"unknown config name={name!r}; available configs: {names}")
    text = _config_dir().joinpath(f"{name}.json").read_text(encoding="utf-8")
    return json.loads(text)


def _describe(config):
    return config.get("_source") or config.get("model_type") or "config"


def _get_dim(config, key, default=None):
    """config[key] as a positive int; a missing key is a ValueError that names it."""
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict (a model's config.json), got {type(config).__name__}")
    if key not in config or config[key] is None:
        if default is not None:
            return default
        raise ValueError(f"config ({_describe(config)}) is missing the key {key!r}")
    value = config[key]
    _checks.check_dim(key, value)
    return value


def _head_dims(config):
    """(n_heads, n_kv_heads, head_dim), with the defaults transformers uses."""
    hidden = _get_dim(config, "hidden_size")
    n_heads = _get_dim(config, "num_attention_heads")
    n_kv = _get_dim(config, "num_key_value_heads", default=n_heads)   # absent: no GQA
    if n_heads % n_kv != 0:
        raise ValueError(
            f"num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv}: "
            f"grouped-query attention shares each K/V head among n_heads / n_kv_heads query heads"
        )
    if config.get("head_dim") is None and hidden % n_heads != 0:
        raise ValueError(
            f"hidden_size={hidden} is not divisible by num_attention_heads={n_heads}; "
            f"give head_dim explicitly"
        )
    head_dim = _get_dim(config, "head_dim", default=hidden // n_heads)
    return n_heads, n_kv, head_dim


# ----------------------------------------------------------------------------- shapes and targets

class LinearShape(NamedTuple):
    """The shape of one linear layer's weight W0: (d, k) = (out_features, in_features)."""

    d: int               # output width, rows of W0 and of B
    k: int               # input width, columns of W0 and of A


def linear_shapes(config):
    """{module name: LinearShape(d, k)} for the seven linear layers of ONE decoder layer.

    W0 is (d, k) = (out, in), as everywhere in the book. Llama-3.1-8B (hidden 4096, 32 heads,
    8 KV heads of 128, intermediate 14336):
        q_proj (4096, 4096)  k_proj (1024, 4096)  v_proj (1024, 4096)  o_proj (4096, 4096)
        gate_proj, up_proj (14336, 4096)          down_proj (4096, 14336)

    Book: eq-ch01-shapes (notebooks/01_cost_of_finetuning).
    """
    hidden = _get_dim(config, "hidden_size")
    inter = _get_dim(config, "intermediate_size")
    n_heads, n_kv, head_dim = _head_dims(config)
    q_out = n_heads * head_dim               # all query heads
    kv_out = n_kv * head_dim                 # GQA: only n_kv heads of keys and values
    return {
        "q_proj": LinearShape(d=q_out, k=hidden),
        "k_proj": LinearShape(d=kv_out, k=hidden),
        "v_proj": LinearShape(d=kv_out, k=hidden),
        "o_proj": LinearShape(d=hidden, k=q_out),
        "gate_proj": LinearShape(d=inter, k=hidden),
        "up_proj": LinearShape(d=inter, k=hidden),
        "down_proj": LinearShape(d=hidden, k=inter),
    }


def resolve_targets(target_modules):
    r"""The modules of one decoder layer that ``target_modules`` selects, in model order.

    The rule is PEFT's, from ``lora_ref.targets``, applied to the names the layers have in a
    Hugging Face model ("model.layers.0.self_attn.q_proj", ...), so a count here adapts the
    same layers as ``torch.add_lora`` or PEFT would: ["q_proj", "v_proj"] or the named set
    "qv" -> ("q_proj", "v_proj"); r".*\.(q|v)_proj" the same; "all-linear" all seven (the
    output layer lm_head is not a decoder layer's); the bare string "q_proj" is a regex
    that matches no whole name, and raises.
    """
    chosen = _targets.select(list(_LAYER_NAMES.values()), target_modules)
    return tuple(m for m, full in _LAYER_NAMES.items() if full in chosen)


def selected_linears(config, target_modules):
    r"""Every (layer index, module) of a model that ``target_modules`` selects, in model order.

    The names matched are the full ones, "model.layers.{i}.mlp.gate_proj" for every decoder
    layer i, as PEFT matches them, so a layer-indexed regex such as
    r".*layers\.1\.mlp\.(gate|up|down)_proj" selects the MLP of layer 1 only. Raises when
    nothing is selected, naming what the layers' names end in.
    """
    n_layers = _get_dim(config, "num_hidden_layers")
    names = {_full_name(i, m): (i, m) for i in range(n_layers) for m in LINEAR_MODULES}
    return tuple(names[n] for n in _targets.select(list(names), target_modules))


# ----------------------------------------------------------------------------- parameter counts

def lora_param_count(config, r, target_modules):
    """Trainable LoRA parameters:  sum over the adapted layers of r (d + k), which is
    n_layers * sum_targets r (d + k) when every decoder layer is adapted alike.

    A: (r, k) has r k entries and B: (d, r) has d r. The layers are those PEFT adapts
    (``selected_linears``), a layer-indexed regex included.
    Llama-3.1-8B, r=16: "qv" 6,815,744; "attention" 13,631,488; "all-linear" 41,943,040.

    Book: eq-ch01-lora (notebooks/01_cost_of_finetuning).
    """
    _checks.check_rank(r)
    shapes = linear_shapes(config)
    total = 0
    for _, name in selected_linears(config, target_modules):
        d, k = shapes[name]
        _checks.check_rank(r, d, k)                   # rank(B A) <= min(d, k)
        total += r * (d + k)                          # |A| + |B| = r k + d r
    return total


def module_subsets():
    """All 127 non-empty subsets of LINEAR_MODULES, as tuples in model order."""
    return [subset for k in range(1, len(LINEAR_MODULES) + 1)
            for subset in itertools.combinations(LINEAR_MODULES, k)]


class CountMatch(NamedTuple):
    """One configuration found by search_lora_counts."""

    config: str          # shipped config name, e.g. "llama-2-7b"
    targets: object      # a named target set ("qv") or a tuple of module names
    r: int
    count: int           # lora_param_count(config, r, targets)


def search_lora_counts(figure_millions, decimals=1, configs=None,
                       target_sets=(*_targets.NAMED_SETS, _targets.ALL_LINEAR), ranks=tuple(2**e for e in range(11))):
    """Every (config, targets, r) whose LoRA count rounds to `figure_millions` million.

    A published figure such as "8.4M" is checked against every combination of the shipped
    configs (or `configs`, a list of names) x `target_sets` (named sets or lists of module
    names; module_subsets() gives all 127) x `ranks` (default r = 1, 2, 4, ..., 1024; an r
    above min(d, k) of a target is skipped). A count matches when it rounds, half up,
    to the figure at `decimals` decimals of a million: 8,388,608 -> 8.4.
    It says which configurations a figure is right for; it cannot say why a source wrote it.
    """
    _checks.check_finite_scalar("figure_millions", figure_millions)
    if isinstance(decimals, bool) or not isinstance(decimals, int) or not 0 <= decimals <= 6:
        raise ValueError(f"decimals must be an integer from 0 to 6 (of a million), got decimals={decimals!r}")
    unit = 10 ** (6 - decimals)                           # 1e5 for one decimal of a million
    wanted = round(figure_millions * 10**decimals)        # 8.4 -> 84, an integer
    matches = []
    for name in (available_configs() if configs is None else configs):
        cfg = load_config(name)
        shapes = linear_shapes(cfg)
        for targets in target_sets:
            names = resolve_targets(targets)
            max_r = min(min(shapes[m]) for m in names)    # r <= min(d, k) for every target
            key = targets if isinstance(targets, str) else names
            for r in ranks:
                if r > max_r:
                    continue
                count = lora_param_count(cfg, r, names)
                if (2 * count + unit) // (2 * unit) == wanted:    # round half up, in integers
                    matches.append(CountMatch(name, key, r, count))
    return matches


def _bias_modules(config):
    """The linear layers that carry a bias vector (of size d, the output width), as transformers builds them.

    qwen2: q, k, v always (Qwen2Attention hard-codes bias=True; o_proj has none).
    mistral: none.  llama and others: q, k, v, o if attention_bias; gate, up, down if mlp_bias.
    """
    model_type = config.get("model_type")
    if model_type == "qwen2":
        return ("q_proj", "k_proj", "v_proj")
    if model_type == "mistral":
        return ()
    out = ()
    if config.get("attention_bias", False):
        out += ("q_proj", "k_proj", "v_proj", "o_proj")
    if config.get("mlp_bias", False):
        out += ("gate_proj", "up_proj", "down_proj")
    return out


def decoder_linear_param_count(config):
    """Weights of the linear layers of all decoder layers: n_layers * sum_7 d k (no biases).

    These are the weights that QLoRA stores in NF4.
    """
    n_layers = _get_dim(config, "num_hidden_layers")
    return n_layers * sum(d * k for d, k in linear_shapes(config).values())


def base_param_breakdown(config):
    """Parameters of the base model, by component (they sum to base_param_count).

    embed_tokens     V h
    linear weights   n_layers sum_7 d k
    linear biases    n_layers sum_{biased} d          (Qwen2: q, k, v)
    layer norms      n_layers * 2 h                          (input and post-attention RMSNorm weights)
    final norm       h
    lm_head          V h, or 0 when tie_word_embeddings (it reuses embed_tokens)

    Book: eq-ch01-base (notebooks/01_cost_of_finetuning).
    """
    hidden = _get_dim(config, "hidden_size")
    vocab = _get_dim(config, "vocab_size")
    n_layers = _get_dim(config, "num_hidden_layers")
    shapes = linear_shapes(config)
    tied = bool(config.get("tie_word_embeddings", False))
    return {
        "embed_tokens": vocab * hidden,
        "linear weights": decoder_linear_param_count(config),
        "linear biases": n_layers * sum(shapes[m].d for m in _bias_modules(config)),
        "layer norms": n_layers * 2 * hidden,
        "final norm": hidden,
        "lm_head": 0 if tied else vocab * hidden,
    }


def base_param_count(config):
    """All parameters of the base model (Llama-3.1-8B: 8,030,261,248).

    Book: eq-ch01-base (notebooks/01_cost_of_finetuning).
    """
    return sum(base_param_breakdown(config).values())


def adapter_bytes(config, r, target_modules, bytes_per_param=4):
    """Size of the saved adapter weights: |LoRA params| * bytes_per_param.

    The default, 4 (fp32), is what PEFT writes: get_peft_model(..., autocast_adapter_dtype=True),
    its default, upcasts bf16/fp16 adapter weights to fp32, and save_pretrained keeps them so,
    even on a bf16 base model. Pass 2 for an adapter cast to bf16/fp16 before saving.
    This is the tensor data only: adapter_model.safetensors adds an 8-byte length and a JSON
    header (about 130 bytes per tensor, two tensors per adapted matrix; tests/test_budget.py).
    """
    _checks.check_finite_scalar("bytes_per_param", bytes_per_param)
    if bytes_per_param <= 0:
        raise ValueError(f"bytes_per_param must be positive, got bytes_per_param={bytes_per_param}")
    return lora_param_count(config, r, target_modules) * bytes_per_param


# ----------------------------------------------------------------------------- NF4

def nf4_bits_per_param(blocksize=64, double_quant=True, dq_blocksize=256):
    """Storage per weight of blockwise NF4 (QLoRA, Dettmers et al. 2023, Sec. 3), in bits.

    Each weight is a 4-bit code. Each block of `blocksize` weights (64 in QLoRA) also stores
    its absmax constant c, so the overhead per weight is (bits of c) / blocksize:

      without double quantisation, c is fp32:      4 + 32 / 64                   = 4.5
      with double quantisation, c is 8-bit, and one fp32 constant is kept per
      dq_blocksize (256) blocks of c:              4 + 8 / 64 + 32 / (64 * 256)  = 4.126953125

    (bitsandbytes also keeps, per matrix, the mean subtracted from the c's and its own copies
    of the 16-entry NF4 code and the 256-entry 8-bit map: 4 + 64 + 1,024 = 1,092 bytes, left
    out here; ``qlora_training_memory`` counts them.) The one formula for NF4's storage: the
    chapters, ``quant`` and the exercises all call this function.

    Book: eq-ch08-bits (notebooks/08_qlora).
    """
    for name, value in (("blocksize", blocksize), ("dq_blocksize", dq_blocksize)):
        _checks.check_dim(name, value)
    code_bits = 4                                  # one NF4 code: 16 levels
    fp32_bits = 8 * BYTES_PER_PARAM["fp32"]        # 32
    if not double_quant:
        return code_bits + fp32_bits / blocksize
    int8_bits = 8
    return code_bits + int8_bits / blocksize + fp32_bits / (blocksize * dq_blocksize)


# ----------------------------------------------------------------------------- memory

@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Training memory, in bytes, by component. Activations are not included.

    params_total:     parameters of the model being trained (base + adapter)
    params_trainable: parameters that get gradients and optimizer state
    breakdown:        {component name: bytes}, read-only
    """

    method: str
    params_total: int
    params_trainable: int
    breakdown: Mapping

    def __post_init__(self):
        object.__setattr__(self, "breakdown", types.MappingProxyType(dict(self.breakdown)))

    @property
    def total_bytes(self):
        return sum(self.breakdown.values())

    @property
    def gb(self):
        """Total in GB, 1e9 bytes (what GPU vendors and the LoRA/QLoRA papers quote)."""
        return self.total_bytes / 1e9

    @property
    def gib(self):
        """Total in GiB, 2**30 bytes (what nvidia-smi and torch.cuda report)."""
        return self.total_bytes / 2**30


def _scheme(scheme):
    if scheme not in OPTIMIZER_SCHEMES:
        raise ValueError(f"unknown optimizer scheme={scheme!r}; known schemes: {list(OPTIMIZER_SCHEMES)}")
    return OPTIMIZER_SCHEMES[scheme]


def bytes_per_param(scheme="mixed-precision Adam"):
    """Training state per trainable parameter under `scheme` (a key of OPTIMIZER_SCHEMES), in bytes.

    fp32 Adam 16, mixed-precision Adam 16, bf16 weights + fp32 Adam 12, mixed-precision
    8-bit Adam 10.03125, pure bf16 Adam 8, bf16 + 8-bit Adam 6.03125 (8-bit: 2 + 8/256).
    """
    return sum(_scheme(scheme).values())


def _adam_bytes(n, scheme="mixed-precision Adam", prefix=""):
    """{component: bytes} for n trainable parameters under `scheme`.

    The default, mixed-precision Adam, is 16 bytes/param: bf16 weights 2 + bf16 gradients 2 +
    fp32 master weights 4 + Adam m 4 + Adam v 4 (the "2 + 2 + 12" of Rajbhandari et al. 2020,
    ZeRO, Sec. 3.1, with K = 12).
    """
    return {f"{prefix}{part}": per_param * n for part, per_param in _scheme(scheme).items()}


def full_finetune_memory(config, scheme="mixed-precision Adam"):
    """Full fine-tuning: bytes_per_param(scheme) for each of the N base parameters.

    Default, mixed-precision Adam with fp32 master weights (16 bytes/param), for Llama-3.1-8B:
    16 * 8,030,261,248 = 128,484,179,968 bytes = 128.48 GB. Activations excluded.
    The 8-bit schemes count bitsandbytes' state for every parameter; bitsandbytes keeps
    tensors under 4096 entries (norm weights) in 32-bit state, a difference left out here.

    Book: eq-ch01-full (notebooks/01_cost_of_finetuning).
    """
    n = base_param_count(config)
    return MemoryEstimate("full fine-tune", n, n, _adam_bytes(n, scheme))


def lora_memory(config, r, target_modules):
    """LoRA: the frozen base in bf16 (2 bytes/param, no gradients, no optimizer state), plus
    the P LoRA parameters at 16 bytes/param: mixed-precision Adam, or equally fp32 adapter
    weights, gradients, m and v (4 + 4 + 4 + 4), as PEFT keeps them by default.

    total = 2 N + 16 P bytes. Activations excluded.

    Book: eq-ch01-lora-mem (notebooks/01_cost_of_finetuning).
    """
    n = base_param_count(config)
    p = lora_param_count(config, r, target_modules)
    breakdown = {"frozen base weights (bf16)": BYTES_PER_PARAM["bf16"] * n}
    breakdown.update(_adam_bytes(p, prefix="LoRA "))
    return MemoryEstimate("LoRA", n + p, p, breakdown)


def qlora_memory(config, r, target_modules, double_quant=True):
    """QLoRA: the frozen base with its decoder linear weights in NF4, plus LoRA under Adam.

    Assumptions (as bitsandbytes' 4-bit loading does it, with blocksize 64):
      - the weights of q, k, v, o, gate, up, down in every layer are NF4, at
        nf4_bits_per_param(64, double_quant) bits each (4.127 with double quantisation);
      - embed_tokens, lm_head, the RMSNorm weights and any biases stay in bf16;
      - the P LoRA parameters take 16 bytes each, as in lora_memory (paged optimizers,
        which move Adam state to CPU RAM, are not modelled).
    total = N_lin * bits / 8 + 2 (N - N_lin) + 16 P bytes. Activations excluded.

    Book: eq-ch01-lora-mem (notebooks/01_cost_of_finetuning).
    """
    n = base_param_count(config)
    n_lin = decoder_linear_param_count(config)
    p = lora_param_count(config, r, target_modules)
    bits = nf4_bits_per_param(double_quant=double_quant)
    breakdown = {
        f"frozen linear weights (NF4, {bits:.4g} bits)": n_lin * bits / 8,
        "frozen embeddings, lm_head, norms, biases (bf16)": BYTES_PER_PARAM["bf16"] * (n - n_lin),
    }
    breakdown.update(_adam_bytes(p, prefix="LoRA "))
    return MemoryEstimate("QLoRA", n + p, p, breakdown)


# ----------------------------------------------------------------------------- compute

def forward_macs(T, d, k, r, how="factored"):
    """Multiply-accumulates of one LoRA layer's forward pass over T tokens (x: (T, k)).

    how="base":         x W0^T                          T d k
    how="factored":     x W0^T + s (x A^T) B^T          T d k + T r k + T r d  =  T (d k + r (k + d))
    how="materialised": form W0 + s B A, then x W^T     d r k + T d k
    (the d k additions and scalings are O(d k + T d) and left out; one MAC is 2 FLOPs.)

    Book: eq-ch02-macs (notebooks/02_forward_pass).
    """
    for name, value in (("T", T), ("d", d), ("k", k)):
        _checks.check_dim(name, value)
    _checks.check_rank(r, d, k)
    if how == "base":
        return T * d * k
    if how == "factored":
        return T * (d * k + r * (k + d))
    if how == "materialised":
        return d * r * k + T * d * k
    raise ValueError(f"how must be 'base', 'factored' or 'materialised', got how={how!r}")


def materialise_crossover_tokens(d, k):
    """Tokens T* above which forming B A once per forward costs fewer MACs than the bypass.

    factored - materialised = T r (k + d) - d r k > 0   <=>   T > d k / (d + k) = T*,
    independent of r (r cancels). For d = k, T* = d / 2.

    Book: eq-ch02-crossover, prop-ch02-crossover (notebooks/02_forward_pass).
    """
    _checks.check_dim("d", d)
    _checks.check_dim("k", k)
    return d * k / (d + k)


# ----------------------------------------------------------------------------- a mixed batch of adapters

# The ways batched_lora_forward computes y_i = W0 x_i + s_a B_a A_a x_i for a batch whose rows use
# different adapters a (both backends, the same numbers).
MIXED_BATCH_METHODS = ("gathered", "segmented", "padded", "stacked")

# What a mixed batch costs beyond its multiply-adds, in multiply-add equivalents of a large fp32
# GEMM (about 12 ps each on 2 cores): "op" is one tensor operation launched (a fixed cost: dispatch,
# waking threads, a small GEMM far below peak), "copy" one float moved by a gather, a scatter or a
# permutation, "gather" one float of A_a or B_a copied for its row and read once more by a batched
# matrix-vector product. Nonnegative least squares over two runs of benchmarks/bench_multi_adapter.py
# --fit (fp32, 2 cores, r = 16, d = k in 256 .. 4096, m in 1 .. 64, n in 8 .. 512; 72 timings of each
# method), rounded: op 5.1e5, copy 111, gather 98, and the bypass's own MACs at 0.88 x the base GEMM's
# cost, taken as 1. With these, "auto" ran within 1.15 x the fastest method on 36 and 35 of the 36
# shapes, and at worst 1.35 x (d = 256, m = 16, n = 64: 0.1 ms in all). A GPU has other constants,
# and SGMV kernels that launch few ops.
MIXED_BATCH_CONSTANTS = {"op": 5.0e5, "copy": 110.0, "gather": 100.0}


def mixed_batch_terms(counts, d, k, r, in_order=False):
    """What each way to run a mixed batch does beyond the n d k multiply-adds of x W0^T, counted:
    {method: {"macs", "ops", "copy", "gather"}}, the terms that ``mixed_batch_costs`` weighs.

    counts: rows per adapter (m numbers; rows for the base model alone are not counted);
    d, k: W0's shape; r: the (padded) rank; in_order: the rows already sorted by adapter (no
    permutation). With n = sum(counts), u adapters that have rows and L = max(counts):

                    macs              ops        copy                  gather
        gathered:   0                 15         0                     n r (k + d)   a copy of A_a, B_a per row
        segmented:  n r (k + d)       11 + 2 u   n (k + d)             0             a GEMM pair per adapter
        padded:     u L r (k + d)     32         u L (k + d) + n d     0             two grouped GEMMs, padding included
        stacked:    n m r (k + d)     13         (n + d) m r           0             every row through all m adapters

    "ops" are the ATen operations other than views that lora_ref.torch's code launches, its checks
    of the index included (segmented in order: 7 + 2 u, and no permutation copies; stacked with
    m = 1: 12, the stacked B a view); "copy" the floats moved by gathers, scatters and permutations;
    "gather" the floats of A_a, B_a copied for their row and read once more by a batched
    matrix-vector product (whose multiply-adds it includes).

    Book: eq-ch09-mixed-cost (notebooks/09_production).
    """
    counts = [int(c) for c in counts]
    if not counts or min(counts) < 0:
        raise ValueError(f"counts must be m >= 1 row counts, each >= 0, got {counts}")
    for name, value in (("d", d), ("k", k)):
        _checks.check_dim(name, value)
    _checks.check_rank(r)
    m, n = len(counts), sum(counts)
    u, L = sum(1 for x in counts if x), max(counts)
    bypass = r * (k + d)                                         # MACs of one row's shrink and expand
    return {
        "gathered": {"macs": 0, "ops": 15, "copy": 0, "gather": n * bypass},
        "segmented": {"macs": n * bypass, "ops": (7 if in_order else 11) + 2 * u,
                      "copy": 0 if in_order else n * (k + d), "gather": 0},
        "padded": {"macs": u * L * bypass, "ops": 32, "copy": u * L * (k + d) + n * d, "gather": 0},
        "stacked": {"macs": n * m * bypass, "ops": 12 + (m > 1), "copy": (n + d) * m * r, "gather": 0},
    }


def mixed_batch_costs(counts, d, k, r, in_order=False, constants=None):
    """The modelled cost of each way to run a mixed batch, in multiply-add equivalents:

        cost = n d k + macs + c_op ops + c_copy copy + c_gather gather

    with the terms of ``mixed_batch_terms`` (same arguments) and c = MIXED_BATCH_CONSTANTS, or
    those of ``constants`` where given.

    Book: eq-ch09-mixed-cost (notebooks/09_production).
    """
    terms = mixed_batch_terms(counts, d, k, r, in_order)
    c = {**MIXED_BATCH_CONSTANTS, **(constants or {})}
    base = sum(int(x) for x in counts) * d * k
    return {name: base + t["macs"] + c["op"] * t["ops"] + c["copy"] * t["copy"] + c["gather"] * t["gather"]
            for name, t in terms.items()}


def mixed_batch_method(counts, d, k, r, in_order=False, constants=None):
    """The method of MIXED_BATCH_METHODS with the lowest ``mixed_batch_costs``: what
    batched_lora_forward(method="auto") runs (ties go to the earlier name)."""
    costs = mixed_batch_costs(counts, d, k, r, in_order, constants)
    return min(MIXED_BATCH_METHODS, key=lambda name: costs[name])


# ----------------------------------------------------------------------------- QLoRA as lora_ref.hub runs it

# Components of qlora_training_memory, in bytes; lora_ref.hub.held_bytes measures the same keys.
NF4_CODES = "NF4 codes (4 bits)"
NF4_ABSMAX = "NF4 block constants (8 bits per 64)"
NF4_DQ_ABSMAX = "double-quant constants (fp32 per 256 blocks)"
NF4_PER_MATRIX = "per-matrix NF4 code, dynamic map, offset (1,092 B)"
UPCAST_REST = "embeddings, norms, lm_head, biases (fp32)"
LORA_FACTORS = "LoRA A, B (fp32)"
LORA_GRADS = "LoRA gradients (fp32)"
OPT_8BIT = "Adam m, v (8-bit codes)"
OPT_8BIT_ABSMAX = "Adam m, v block constants (fp32 per 256)"
OPT_QMAPS = "Adam 8-bit maps (2 x 256 fp32, shared)"
OPT_32BIT = "Adam m, v (fp32, tensors under min_8bit_size)"
OPT_STEP = "Adam step counters (fp32, one per tensor)"

# bitsandbytes' per-matrix extras with double quantisation (tests/test_memory_oracle.py):
# quant_state.code, the 16 NF4 levels in fp32 (64 B); quant_state.state2.code, the 256-entry
# dynamic map in fp32 (1,024 B); quant_state.offset, the fp32 mean subtracted from the constants.
_NF4_PER_MATRIX_BYTES = 16 * 4 + 256 * 4 + 4
_BNB_QMAP_BYTES = 2 * 256 * 4          # Optimizer2State's "dynamic" (m) and "udynamic" (v) maps
QLORA_OPTIMIZERS = ("PagedAdamW8bit", "AdamW")


def _ceil_div(a, b):
    return -(-a // b)


def _nf4_matrix_bytes(n, blocksize, dq_blocksize):
    """(codes, 8-bit constants, fp32 constants) bytes of one n-weight matrix in NF4 + double quant."""
    blocks = _ceil_div(n, blocksize)                       # one absmax c per block of 64 weights
    return _ceil_div(n, 2), blocks, 4 * _ceil_div(blocks, dq_blocksize)


def _adapter_tensor_sizes(config, r, target_modules):
    """Entries of every LoRA tensor: r k for A (r, k) and d r for B (d, r), per target per layer."""
    shapes = linear_shapes(config)
    sizes = []
    for _, name in selected_linears(config, target_modules):
        d, k = shapes[name]
        _checks.check_rank(r, d, k)
        sizes += [r * k, d * r]                           # |A|, |B|
    return sizes


def qlora_training_memory(config, r, target_modules="all-linear", optimizer="PagedAdamW8bit",
                          blocksize=64, dq_blocksize=256, min_8bit_size=4096):
    """Bytes of every tensor that QLoRA training holds after an optimizer step, as lora_ref.hub runs it.

    The configuration: from_pretrained with BitsAndBytesConfig(load_in_4bit, nf4, double quant),
    prepare_model_for_kbit_training, PEFT LoRA (fp32 factors) on `target_modules`, and
    bitsandbytes' PagedAdamW8bit (or torch's AdamW, optimizer="AdamW"). Every term, exactly:

    NF4, for each of the n_layers * 7 decoder matrices of n = d k weights (bitsandbytes quantises
    every linear layer but lm_head, whatever target_modules is):
      codes                 ceil(n / 2)                     4 bits per weight
      block constants       ceil(n / 64)                    one uint8 c per block of 64
      double-quant consts   4 ceil(ceil(n / 64) / 256)      one fp32 per 256 c's
      per matrix            1,092                           NF4 code 64 + dynamic map 1,024 + offset 4
    (when 64 * 256 divides n, the first three are n * nf4_bits_per_param() / 8: 4.127 bits)
    the rest                4 (N - N_lin)                   embeddings, norms, lm_head, biases: fp32,
                                                            as prepare_model_for_kbit_training upcasts them
    LoRA, for each adapter tensor of m entries (A: r k, B: d r):
      factors, gradients    4 m + 4 m                       fp32 (PEFT's autocast_adapter_dtype)
    PagedAdamW8bit, per adapter tensor:
      m >= min_8bit_size    2 m + 8 ceil(m / 256)           m, v as uint8 codes + an fp32 absmax each per 256
      m <  min_8bit_size    8 m                             m, v in fp32: bitsandbytes keeps small tensors in 32 bits
      once                  2,048                           its two 256-entry fp32 maps, shared by all tensors
    (paged: on a GPU the state of tensors of 1e5 entries or more lives in CUDA unified memory;
    the bytes are the same. bitsandbytes counts the step in a Python int, 0 bytes.)
    AdamW instead:          8 m + 4                          fp32 m, v and a scalar step tensor per tensor

    Left out: activations, which grow with batch and sequence length (and are cut by gradient
    checkpointing), the logits (batch x length x vocabulary, in fp32 for the loss), the weight
    each Linear4bit dequantises for its matmul (transient), the CUDA context and the allocator's
    cache, and small buffers such as RoPE's inverse frequencies. So this is the static floor: a
    GPU's peak (torch.cuda.max_memory_allocated) is this plus activations and transients.
    tests/test_hub_qlora.py checks the equality on CPU, term by term, after one optimizer step.
    """
    if optimizer not in QLORA_OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {QLORA_OPTIMIZERS}, got optimizer={optimizer!r}")
    for name, value in (("blocksize", blocksize), ("dq_blocksize", dq_blocksize), ("min_8bit_size", min_8bit_size)):
        _checks.check_dim(name, value)
    n_layers = _get_dim(config, "num_hidden_layers")
    n = base_param_count(config)
    n_lin = decoder_linear_param_count(config)
    b = dict.fromkeys((NF4_CODES, NF4_ABSMAX, NF4_DQ_ABSMAX, NF4_PER_MATRIX), 0)
    for d, k in linear_shapes(config).values():
        codes, absmax, dq = _nf4_matrix_bytes(d * k, blocksize, dq_blocksize)
        b[NF4_CODES] += n_layers * codes
        b[NF4_ABSMAX] += n_layers * absmax
        b[NF4_DQ_ABSMAX] += n_layers * dq
        b[NF4_PER_MATRIX] += n_layers * _NF4_PER_MATRIX_BYTES
    b[UPCAST_REST] = BYTES_PER_PARAM["fp32"] * (n - n_lin)

    sizes = _adapter_tensor_sizes(config, r, target_modules)
    p = sum(sizes)
    b[LORA_FACTORS] = BYTES_PER_PARAM["fp32"] * p
    b[LORA_GRADS] = BYTES_PER_PARAM["fp32"] * p
    if optimizer == "AdamW":
        b[OPT_32BIT] = 2 * BYTES_PER_PARAM["fp32"] * p
        b[OPT_STEP] = 4 * len(sizes)
    else:
        big = [m for m in sizes if m >= min_8bit_size]
        b[OPT_8BIT] = 2 * sum(big)                                                    # m and v, 1 byte each
        b[OPT_8BIT_ABSMAX] = 2 * 4 * sum(_ceil_div(m, _BNB_STATE_BLOCKSIZE) for m in big)
        b[OPT_QMAPS] = _BNB_QMAP_BYTES if big else 0
        b[OPT_32BIT] = 2 * BYTES_PER_PARAM["fp32"] * sum(m for m in sizes if m < min_8bit_size)
    return MemoryEstimate(f"QLoRA, {optimizer}", n + p, p, b)


__all__ += ["qlora_training_memory", "QLORA_OPTIMIZERS"]
