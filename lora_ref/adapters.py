"""PEFT's adapter file format, written and read without PEFT (and without pickle).

A LoRA adapter on disk is a directory of two files:

    adapter_config.json         a PEFT LoraConfig as JSON:
                                {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": false,
                                 "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0, ...}
    adapter_model.safetensors   for each adapted nn.Linear named <name> (W0: (d, k)):
                                base_model.model.<name>.lora_A.weight   A: (r, k)
                                base_model.model.<name>.lora_B.weight   B: (d, r)

The layer then computes y = W0 x + s B A x with s = lora_alpha / r (lora_alpha / sqrt(r)
with use_rslora). The adapter name PEFT uses in memory ("default") is not in the saved keys;
"base_model.model." is the prefix of the wrapped model inside a PeftModel.

``save_adapter`` writes a directory that ``peft.PeftModel.from_pretrained`` loads;
``load_adapter`` reads one that ``PeftModel.save_pretrained`` wrote. Tensors go through
safetensors only: a pickle file can run code when loaded, a safetensors file cannot.
"""

from __future__ import annotations

import functools
import json
import math
import numbers
import os
import re
import shutil
import tempfile

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from . import _checks, targets
from . import torch as lt

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_adapter", "load_adapter", "read_adapter_config",
           "read_adapter_factors", "COMBINATION_TYPES", "task_arithmetic_delta", "combine_factors", "combine_adapters"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."                      # the base model's place inside a PeftModel
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<factor>[AB])\.weight$")

# LoraConfig fields that change the layout of the file or the forward pass, with the value
# each has in a plain LoRA adapter. Any other value means an adapter lora_ref cannot
# reproduce (DoRA, per-layer ranks, Conv1D weights stored transposed, ...): refuse it.
_PLAIN_LORA = {
    "bias": "none",
    "fan_in_fan_out": False,
    "use_dora": False,
    "lora_bias": False,
    "use_qalora": False,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layers_to_transform": None,
    "exclude_modules": None,
    "modules_to_save": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "velora_config": None,
    "monteclora_config": None,
}


# --------------------------------------------------------------------------- config


def _is_neutral(value, plain):
    """None, False, {} and [] all mean 'feature off' (but 0 does not: layers_to_transform=0
    means layer 0 only); "none" is the off value of bias."""
    return value is None or value is False or value == plain or (isinstance(value, (dict, list)) and not value)


def _check_hyperparameters(config, where):
    """r a positive int, lora_alpha finite, use_rslora a bool, lora_dropout in [0, 1), and
    target_modules a non-empty list of names or a regex string."""
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{where}: missing key {key!r}")
    r, alpha = config["r"], config["lora_alpha"]
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise ValueError(f"{where}: r must be a positive integer, got r={r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise ValueError(f"{where}: lora_alpha must be a finite number, got lora_alpha={alpha!r}")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ValueError(f"{where}: use_rslora must be true or false, got {rslora!r}")
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"{where}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    targets = config["target_modules"]
    ok_list = isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)
    if not (ok_list or (isinstance(targets, str) and targets)):
        raise ValueError(f"{where}: target_modules must be a non-empty list of names or a regex, got {targets!r}")


def _check_config(config, where):
    """Validate a parsed adapter_config.json; ``where`` names the file in every message."""
    if not isinstance(config, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{where}: peft_type must be 'LORA', got {config.get('peft_type')!r}")
    _check_hyperparameters(config, where)
    for key, plain in _PLAIN_LORA.items():
        if not _is_neutral(config.get(key, plain), plain):
            raise ValueError(
                f"{where}: {key}={config[key]!r} is not plain LoRA (expected {plain!r}); "
                f"lora_ref only reads adapters with y = W0 x + s B A x on nn.Linear layers"
            )
    return config


def read_adapter_config(path):
    """The validated adapter_config.json of the adapter directory ``path``, as a dict."""
    file = os.path.join(os.fspath(path), CONFIG_NAME)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"no adapter config: {file} does not exist")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: malformed JSON: {exc}") from exc
    return _check_config(config, file)


# --------------------------------------------------------------------------- targets


def _linear_sites(model):
    """{name: layer} for every place an adapter can sit: each LoRALinear, and each nn.Linear
    that is not the base_layer inside a LoRALinear. Names are the names PEFT saves under."""
    lora = lt.lora_modules(model)
    inner = {f"{n}.base_layer" for n in lora}
    sites = {n: m for n, m in model.named_modules()
             if isinstance(m, lt.LoRALinear) or (isinstance(m, nn.Linear) and n not in inner)}
    return sites


def _selected(model, target_modules):
    """Names of the linear sites ``target_modules`` selects, by PEFT's rule (``lora_ref.targets``),
    in model order; empty when none."""
    return targets.select(list(_linear_sites(model)), target_modules,
                          output_layers=targets.output_layer_names(model), required=False)


def _default_targets(model, names):
    """Sorted last name components if they select exactly ``names``, else the full names.

    Sorted, so the config is byte-stable (PEFT writes a set, whose order depends on
    PYTHONHASHSEED); full names when suffixes would also catch un-adapted layers.
    """
    suffixes = sorted({n.split(".")[-1] for n in names})
    return suffixes if set(_selected(model, suffixes)) == set(names) else sorted(names)


# --------------------------------------------------------------------------- save


def _shared_hyperparameters(layers):
    """(r, alpha, rslora, dropout), which every LoRA layer must share: the config holds one of each."""
    def hp(m):
        p = m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0
        alpha = int(m.alpha) if isinstance(m.alpha, numbers.Integral) else float(m.alpha)
        return (int(m.r), alpha, bool(m.rslora), float(p))          # plain Python: JSON-serialisable

    groups = {}
    for name, m in layers.items():
        groups.setdefault(hp(m), []).append(name)
    if len(groups) > 1:
        detail = "; ".join(f"(r, alpha, rslora, dropout)={k}: {v}" for k, v in groups.items())
        raise ValueError(f"all LoRA layers must share r, alpha, rslora and dropout to be saved as one adapter; {detail}")
    return next(iter(groups))


def _adapter_tensors(layers):
    """{PEFT key: tensor}: A (r, k) and B (d, r) of each layer, detached, on the CPU, contiguous."""
    out = {}
    for name, m in layers.items():
        out[f"{PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().cpu().contiguous().clone()
        out[f"{PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().cpu().contiguous().clone()
    return out


def _config_dict(model, layers, target_modules, base_model_name_or_path, task_type):
    r, alpha, rslora, dropout = _shared_hyperparameters(layers)
    if target_modules is None:
        target_modules = _default_targets(model, list(layers))
    elif not isinstance(target_modules, str):
        target_modules = sorted(target_modules)
    chosen = set(_selected(model, target_modules))
    if chosen != set(layers):
        raise ValueError(
            f"target_modules={target_modules!r} must select exactly the LoRA layers; "
            f"it also selects {sorted(chosen - set(layers))} and misses {sorted(set(layers) - chosen)}"
        )
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return {
        "alpha_pattern": {},
        "base_model_name_or_path": base_model_name_or_path,
        "bias": "none",
        "exclude_modules": None,
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_pattern": None,
        "layers_to_transform": None,
        "lora_alpha": alpha,
        "lora_bias": False,
        "lora_dropout": float(dropout),
        "modules_to_save": None,
        "peft_type": "LORA",
        "r": r,
        "rank_pattern": {},
        "revision": None,
        "target_modules": target_modules,
        "task_type": task_type,
        "use_dora": False,
        "use_rslora": bool(rslora),
    }


def _fsync(file):
    with open(file, "rb") as f:
        os.fsync(f.fileno())


def _write_dir(tmp, config, tensors):
    with open(os.path.join(tmp, CONFIG_NAME), "w", encoding="utf-8") as f:
        f.write(json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n")
    save_file(tensors, os.path.join(tmp, WEIGHTS_NAME), metadata={"format": "pt"})
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        _fsync(os.path.join(tmp, name))


def _publish(path, config, tensors):
    """Write an adapter directory at ``path`` (absolute) all at once: into a temporary sibling,
    then renamed into place by _replace_dir, so a failure leaves no half-written adapter.
    The directory gets the usual mode (0o777 less the umask), not mkdtemp's private 0o700."""
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        _write_dir(tmp, config, tensors)
        _replace_dir(tmp, path)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
    return path


def _replace_dir(tmp, path):
    """Move the finished directory ``tmp`` to ``path``. A new path appears in one rename; an
    old adapter is moved aside, replaced, then deleted (restored if the swap fails)."""
    if not os.path.lexists(path):
        os.rename(tmp, path)
        return
    if not os.path.isdir(path) or os.path.islink(path):
        raise FileExistsError(f"{path} exists and is not a directory")
    others = sorted(set(os.listdir(path)) - {CONFIG_NAME, WEIGHTS_NAME})
    if others:
        raise FileExistsError(f"refusing to replace {path}: it holds files other than an adapter: {others}")
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=os.path.dirname(path))
    os.rmdir(old)
    os.rename(path, old)
    try:
        os.rename(tmp, path)
    except BaseException:
        os.rename(old, path)
        raise
    shutil.rmtree(old)


def save_adapter(model, path, base_model_name_or_path=None, target_modules=None, task_type=None):
    """Write the model's LoRA layers as a PEFT adapter directory ``path``; returns ``path``.

    target_modules: written to the config; by default the sorted last name components of
    the LoRA layers (or their full names if the suffixes would select other layers too).
    task_type: PEFT's task type ("CAUSAL_LM", ...) or None for a plain PeftModel.
    Everything is written into a temporary directory beside ``path`` first, so a failure
    never leaves a half-written adapter. An existing ``path`` is replaced only if it holds
    nothing but adapter files.
    """
    layers = lt.lora_modules(model)
    if not layers:
        raise ValueError("the model has no LoRA layers (lora_ref.torch.LoRALinear) to save; call add_lora first")
    config = _config_dict(model, layers, target_modules, base_model_name_or_path, task_type)
    tensors = _adapter_tensors(layers)
    return _publish(os.path.abspath(os.fspath(path)), config, tensors)


# --------------------------------------------------------------------------- load


def _read_tensors(path):
    file = os.path.join(os.fspath(path), WEIGHTS_NAME)
    if not os.path.isfile(file):
        hint = ""
        if os.path.exists(os.path.join(os.fspath(path), "adapter_model.bin")):
            hint = " (adapter_model.bin is a pickle file, which lora_ref does not read: re-save it as safetensors)"
        raise FileNotFoundError(f"no adapter weights: {file} does not exist{hint}")
    try:
        return file, load_file(file)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"{file}: not a readable safetensors file: {exc}") from exc


def _split_keys(tensors, file):
    """{module name: {"A": tensor, "B": tensor}} from PEFT keys; an unknown key is an error."""
    factors = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise ValueError(
                f"{file}: unexpected key {key!r}; expected only "
                f"'{PREFIX}<module>.lora_A.weight' and '{PREFIX}<module>.lora_B.weight'"
            )
        factors.setdefault(m["module"], {})[m["factor"]] = (key, t)
    return factors


def _check_tensor(file, key, t, expected, what):
    if not t.is_floating_point():
        raise ValueError(f"{file}: key {key!r} has dtype {t.dtype}; expected a floating-point tensor")
    if tuple(t.shape) != expected:
        raise ValueError(f"{file}: key {key!r} has shape {tuple(t.shape)}; expected {expected} = {what}")
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        raise ValueError(f"{file}: key {key!r} has {int((~finite).sum())} non-finite value(s) (nan or inf)")


def _check_tensors(model, config, factors, file):
    """Every key names a targeted linear layer, every targeted layer has A (r, k) and B (d, r),
    all finite. Returns the targeted names in model order."""
    r, targets = config["r"], config["target_modules"]
    sites = _linear_sites(model)
    names = _selected(model, targets)
    for module, ab in sorted(factors.items()):
        if module not in names:
            where = "is not a linear layer of the model" if module not in sites else \
                f"is not selected by target_modules={targets!r}"
            raise ValueError(f"{file}: unexpected key {next(iter(ab.values()))[0]!r}: module {module!r} {where}")
    if not names:
        raise ValueError(f"{file}: target_modules={targets!r} selects no linear layer of the model")
    for name in names:
        layer = sites[name]
        d, k = layer.out_features, layer.in_features
        if r > min(d, k):
            raise ValueError(f"{file}: r={r} exceeds min(d, k) = min({d}, {k}) of module {name!r}")
        ab = factors.get(name, {})
        for factor, expected, what in (("A", (r, k), "(r, in_features)"), ("B", (d, r), "(out_features, r)")):
            if factor not in ab:
                raise ValueError(f"{file}: missing key {PREFIX}{name}.lora_{factor}.weight for targeted module {name!r}")
            _check_tensor(file, *ab[factor], expected, what)
    return names


def _check_existing(model, names, config, file):
    """A model that already has LoRA layers must have exactly these, with the config's r, alpha, rslora."""
    layers = lt.lora_modules(model)
    if not layers:
        return False
    if set(layers) != set(names):
        raise ValueError(
            f"{file}: the model already has LoRA layers {sorted(layers)}, but the adapter targets {sorted(names)}; "
            f"load into a model without LoRA layers or with these ones"
        )
    want = (config["r"], config["lora_alpha"], config.get("use_rslora", False))
    for name, m in layers.items():
        if (m.r, m.alpha, m.rslora) != want:
            raise ValueError(
                f"{file}: LoRA layer {name!r} has (r, alpha, rslora)={(m.r, m.alpha, m.rslora)} "
                f"but the adapter has {want}"
            )
        if m.merged:
            raise ValueError(f"{file}: LoRA layer {name!r} is merged; unmerge it before loading new factors")
    return True


def load_adapter(model, path):
    """Load the PEFT adapter directory ``path`` into ``model`` (in place) and return the model.

    Everything is checked before the model is touched; any problem raises ValueError (or
    FileNotFoundError for a missing file) and leaves the model exactly as it was. A model
    without LoRA layers gets them from ``add_lora``; one with the same LoRA layers keeps
    them. Then A and B are copied in, cast to each parameter's dtype and device.
    """
    config = read_adapter_config(path)
    file, tensors = _read_tensors(path)
    factors = _split_keys(tensors, file)
    names = _check_tensors(model, config, factors, file)
    if not _check_existing(model, names, config, file):
        with torch.random.fork_rng(devices=[]):             # add_lora's random A is overwritten:
            lt.add_lora(model, names, config["r"], config["lora_alpha"],   # leave the caller's RNG alone
                        dropout=config.get("lora_dropout", 0.0), rslora=config.get("use_rslora", False))
    layers = lt.lora_modules(model)
    with torch.no_grad():
        for name in names:
            for factor, param in (("A", layers[name].lora_A), ("B", layers[name].lora_B)):
                param.copy_(factors[name][factor][1].to(device=param.device, dtype=param.dtype))
    return model


# --------------------------------------------------------------------------- combining adapters

COMBINATION_TYPES = ("cat", "linear", "svd")


def read_adapter_factors(path):
    """``(config, {module name: (A, B)})`` of the PEFT adapter directory ``path``, checked without a model.

    Every module has both factors, A (r, k) and B (d, r) with the config's r, all finite;
    the names are those of the layers in the base model (without PEFT's "base_model.model.").
    """
    config = read_adapter_config(path)
    file, tensors = _read_tensors(path)
    factors = _split_keys(tensors, file)
    if not factors:
        raise ValueError(f"{file}: holds no LoRA tensors")
    r, out = config["r"], {}
    for module, ab in sorted(factors.items()):
        for factor, other in (("A", "B"), ("B", "A")):
            if factor not in ab:
                raise ValueError(f"{file}: missing key {PREFIX}{module}.lora_{factor}.weight "
                                 f"(its lora_{other} is there)")
        (key_a, A), (key_b, B) = ab["A"], ab["B"]
        for key, t in ((key_a, A), (key_b, B)):
            if t.ndim != 2:
                raise ValueError(f"{file}: key {key!r} has shape {tuple(t.shape)}; expected a matrix")
        _check_tensor(file, key_a, A, (r, A.shape[1]), "(r, in_features)")
        _check_tensor(file, key_b, B, (B.shape[0], r), "(out_features, r)")
        out[module] = (A, B)
    return config, out


def _adapter_scaling(config):
    """s = lora_alpha / r, or lora_alpha / sqrt(r) for rsLoRA, from an adapter's config."""
    return lt.scaling(config["lora_alpha"], config["r"], config.get("use_rslora", False))


def _check_weights(weights, m):
    """m finite real weights (negative ones allowed: task negation)."""
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != m:
        raise ValueError(f"weights must be a list of {m} numbers, one per adapter, got {weights!r}")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or not math.isfinite(w):
            raise ValueError(f"weights[{i}] must be a finite number, got {w!r}")
    return [float(w) for w in weights]


def _combination(m, ranks, d, k, combination_type, svd_rank):
    """(combination type, new rank q) as PEFT's add_weighted_adapter sets them, or a ValueError."""
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r} "
                         f"(PEFT's ties, dare_* and magnitude_prune* are not implemented here)")
    if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, numbers.Integral)
                                 or not 1 <= svd_rank <= min(d, k)):
        raise ValueError(f"svd_rank must be None or an integer in [1, min(d, k)] = [1, {min(d, k)}], got {svd_rank!r}")
    if svd_rank is not None and combination_type != "svd":
        raise ValueError(f"svd_rank={svd_rank} is only used by combination_type='svd', not {combination_type!r}")
    if m == 1:
        return "linear", ranks[0]                       # PEFT: one adapter is always combined linearly
    if combination_type == "linear":
        if len(set(ranks)) != 1:
            raise ValueError(f"combination_type='linear' adds the factors, so all ranks must be equal, got r = {ranks}; "
                             f"use 'cat' or 'svd'")
        return "linear", ranks[0]
    if combination_type == "cat":
        return "cat", sum(ranks)
    return "svd", svd_rank if svd_rank is not None else max(ranks)


def task_arithmetic_delta(As, Bs, scalings, weights):
    """The weighted sum of the updates, sum_i w_i s_i B_i A_i: (d, k), float64.

    Book: eq-ch09-cat (notebooks/09_production).
    """
    ranks, d, k = _checks.check_adapter_list([tuple(A.shape) for A in As], [tuple(B.shape) for B in Bs])
    weights = _check_weights(weights, len(As))
    return sum(w * s * (B.double() @ A.double()) for A, B, s, w in zip(As, Bs, scalings, weights))   # (d, k)


def combine_factors(As, Bs, scalings, weights, combination_type="svd", svd_rank=None):
    """One layer of PEFT's ``add_weighted_adapter``: the factors of the combined adapter, whose scale is 1.

    As: m factors A_i (r_i, k);  Bs: m factors B_i (d, r_i);  scalings s_i;  weights w_i.  With omega_i = w_i s_i:
        cat:     A = [omega_1 A_1; ...; omega_m A_m]  (sum r_i, k),   B = [B_1 ... B_m]  (d, sum r_i),
                 so B A = sum_i omega_i B_i A_i exactly
        linear:  A = sum_i sign(omega_i) sqrt|omega_i| A_i,   B = sum_i sqrt|omega_i| B_i   (all r_i equal), so
                 B A = sum_i omega_i B_i A_i + sum_{i != j} sign(omega_j) sqrt|omega_i omega_j| B_i A_j:  cross terms
        svd:     B = U_q diag(sigma_1..q),  A = V_q^T  from the SVD of sum_i omega_i B_i A_i, q = svd_rank
                 or max r_i: the best rank-q approximation of the weighted sum (Eckart-Young)
    One adapter is always combined with "linear", as in PEFT. Computed in float64; returns
    A (q, k), B (d, q).

    Book: eq-ch09-cat, eq-ch09-linear, eq-ch09-svd (notebooks/09_production).
    """
    ranks, d, k = _checks.check_adapter_list([tuple(A.shape) for A in As], [tuple(B.shape) for B in Bs])
    weights = _check_weights(weights, len(As))
    if len(scalings) != len(As):
        raise ValueError(f"need one scaling per adapter: {len(As)} adapters, {len(scalings)} scalings")
    for s in scalings:
        _checks.check_finite_scalar("scaling", s)
    kind, q = _combination(len(As), ranks, d, k, combination_type, svd_rank)
    As = [A.double() for A in As]                                   # (r_i, k)
    Bs = [B.double() for B in Bs]                                   # (d, r_i)
    omega = [w * s for w, s in zip(weights, scalings)]              # omega_i = w_i s_i
    if kind == "cat":
        return torch.cat([o * A for o, A in zip(omega, As)], 0), torch.cat(Bs, 1)      # (sum r_i, k), (d, sum r_i)
    if kind == "linear":
        A = sum(math.copysign(math.sqrt(abs(o)), o) * A for o, A in zip(omega, As))   # the sign goes on A only
        B = sum(math.sqrt(abs(o)) * B for o, B in zip(omega, Bs))
        return A, B                                                                    # (r, k), (d, r)
    U, sigma, Vt = torch.linalg.svd(task_arithmetic_delta(As, Bs, scalings, weights), full_matrices=False)
    return Vt[:q], U[:, :q] * sigma[:q]                                               # (q, k), (d, q)


def _combined_targets(configs, files):
    """target_modules of the combination, as PEFT forms it: the union of the lists, or the regexes joined by |."""
    kinds = {type(c["target_modules"]) for c in configs}
    if len(kinds) != 1:
        raise ValueError(f"target_modules must be all lists or all regex strings (PEFT refuses a mix), got "
                         f"{[c['target_modules'] for c in configs]} in {files}")
    if kinds == {str}:
        return "|".join(f"({c['target_modules']})" for c in configs)
    return sorted(set().union(*(c["target_modules"] for c in configs)))


def combine_adapters(paths, weights, out_path, combination_type="svd", svd_rank=None):
    """Combine PEFT adapter directories into a new one with PEFT's ``add_weighted_adapter`` semantics.

    paths:    m adapter directories (``save_pretrained`` or ``save_adapter``), all on the same layers
    weights:  m finite numbers w_i (negative allowed: task negation)
    combination_type: "cat", "linear" or "svd" (see ``combine_factors``); svd_rank for "svd" only
    Every layer's new factors are ``combine_factors`` of the adapters' factors, in the dtype of
    the inputs; the config is the first adapter's with r = lora_alpha = the new rank (scale 1),
    as PEFT writes it, so ``peft.PeftModel.from_pretrained`` loads the result.

    Everything is read, checked and computed before anything is written, then the directory is
    written beside ``out_path`` and renamed into place: bad input raises and leaves no file.
    Where this differs from PEFT 0.21.2: the result has use_rslora = false (PEFT copies the first
    adapter's flag, so rsLoRA inputs give an update sqrt(q) times too large; fixed upstream in
    PEFT PR #3449), and adapters that adapt different layers or shapes are refused (PEFT combines
    each layer from the adapters that have it). Returns ``out_path``.
    """
    if isinstance(paths, (str, bytes, os.PathLike)) or not hasattr(paths, "__len__") or len(paths) == 0:
        raise ValueError(f"paths must be a non-empty list of adapter directories, got {paths!r}")
    weights = _check_weights(weights, len(paths))
    out_path = os.path.abspath(os.fspath(out_path))
    files = [os.path.abspath(os.fspath(p)) for p in paths]
    if out_path in files:
        raise ValueError(f"out_path {out_path} is one of the input adapters; write the combination elsewhere")
    read = [read_adapter_factors(p) for p in files]
    configs = [config for config, _ in read]
    layers = [factors for _, factors in read]
    for path, factors in zip(files[1:], layers[1:]):
        if set(factors) != set(layers[0]):
            raise ValueError(f"adapters must adapt the same layers: {files[0]} has {sorted(set(layers[0]) - set(factors))} "
                             f"that {path} lacks, and {path} has {sorted(set(factors) - set(layers[0]))} that it lacks")
        for name, (A, B) in factors.items():
            A0, B0 = layers[0][name]
            if (B.shape[0], A.shape[1]) != (B0.shape[0], A0.shape[1]):
                raise ValueError(f"layer {name!r}: {path} updates a {(B.shape[0], A.shape[1])} weight but "
                                 f"{files[0]} a {(B0.shape[0], A0.shape[1])} weight (d, k)")
    bases = {c.get("base_model_name_or_path") for c in configs} - {None}
    if len(bases) > 1:
        raise ValueError(f"adapters were trained on different base models: {sorted(bases)}")
    scalings = [_adapter_scaling(c) for c in configs]
    ranks = [c["r"] for c in configs]
    d_k = {(B.shape[0], A.shape[1]) for A, B in layers[0].values()}
    smallest = min(min(d, k) for d, k in d_k)
    kind, q = _combination(len(files), ranks, smallest, smallest, combination_type, svd_rank)
    dtype = functools.reduce(torch.promote_types, (t.dtype for f in layers for ab in f.values() for t in ab))
    tensors = {}
    for name in layers[0]:
        A, B = combine_factors([f[name][0] for f in layers], [f[name][1] for f in layers], scalings, weights,
                               kind, svd_rank if kind == "svd" else None)
        for factor, t in (("A", A), ("B", B)):
            key = f"{PREFIX}{name}.lora_{factor}.weight"
            tensors[key] = t.to(dtype).contiguous()
            _check_tensor(out_path, key, tensors[key], tuple(t.shape), f"the combined lora_{factor} in {dtype}")
    config = dict(configs[0], r=q, lora_alpha=q, target_modules=_combined_targets(configs, files),
                  alpha_pattern={}, rank_pattern={}, use_rslora=False)
    _check_config(config, f"the combined config for {out_path}")
    return _publish(out_path, config, tensors)
