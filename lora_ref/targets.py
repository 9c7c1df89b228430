"""Which layers does ``target_modules`` select? One rule, PEFT's, for the whole package.

PEFT (``peft.tuners.tuners_utils.check_target_module_exists``) reads ``target_modules``
three ways, and so does every part of ``lora_ref`` that takes it (``torch.add_lora``,
``torch.replace_linears``, ``adapters``, ``budget``):

    a list of names     a module matches if its full name equals a name, or ends in "." + name:
                        ["q_proj", "v_proj"] selects "model.layers.0.self_attn.q_proj", ...
    a string            a regular expression that must match the WHOLE module name
                        (re.fullmatch): r".*\\.(q|v)_proj" selects the same layers as above,
                        while "q_proj" alone selects nothing in a real model
    "all-linear"        every linear layer except the output layer (lm_head)

One extension, for the book's tables: the named sets "qv" (the LoRA paper's W_q, W_v),
"attention" (q, k, v, o) stand for their lists of names. They are read before the regex
rule, so they never reach re.fullmatch.

This module needs no torch: the rule works on names, and a model is only asked for
its module names.
"""

from __future__ import annotations

import re

__all__ = ["ALL_LINEAR", "LINEAR_MODULES", "NAMED_SETS", "expand", "matches", "select", "output_layer_names"]

# The seven linear layers of one decoder layer (Llama, Mistral, Qwen2), in PEFT's names and in
# model order.
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# PEFT's shorthand (peft.utils.constants.INCLUDE_LINEAR_LAYERS_SHORTHAND); compared case-insensitively,
# as PEFT does.
ALL_LINEAR = "all-linear"

# Named sets: "qv" is the LoRA paper's choice (Hu et al. 2021, Sec. 7.1).
NAMED_SETS = {
    "qv": ("q_proj", "v_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
}


def expand(target_modules):
    """Normalise ``target_modules``: "all-linear", a regex string, or a tuple of names.

    Named sets become their tuples; a list keeps its order with duplicates removed
    (PEFT keeps target_modules as a set). Anything else raises, naming the value.
    """
    if isinstance(target_modules, str):
        if not target_modules:
            raise ValueError("target_modules is an empty string: give a list of names, a regex or 'all-linear'")
        if target_modules.lower() == ALL_LINEAR:
            return ALL_LINEAR
        if target_modules in NAMED_SETS:
            return NAMED_SETS[target_modules]
        try:
            re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regular expression: {exc}") from None
        return target_modules
    try:
        names = list(target_modules)
    except TypeError:
        raise TypeError(
            f"target_modules must be a list of module names, a regex string or 'all-linear', "
            f"got {target_modules!r}"
        ) from None
    if not names:
        raise ValueError("target_modules is empty: LoRA needs at least one module to adapt")
    bad = [t for t in names if not (isinstance(t, str) and t)]
    if bad:
        raise ValueError(f"target_modules must hold non-empty strings, got {bad!r} in {names!r}")
    return tuple(dict.fromkeys(names))


def matches(name, target_modules):
    """PEFT's test for one module name: regex full match for a string, name-or-suffix for a list.

    ``target_modules`` must already be expanded and not "all-linear" (which depends on the
    model, not on the name: use ``select``).
    """
    if target_modules == ALL_LINEAR:
        raise ValueError("'all-linear' depends on the model, not on one name: use targets.select(model, ...)")
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return name in target_modules or any(name.endswith("." + t) for t in target_modules)


def output_layer_names(model):
    """The names under which the model holds its output layer, which "all-linear" leaves out.

    As in PEFT (``_maybe_include_all_linear_layers``): the module returned by the model's
    ``get_output_embeddings()`` (lm_head in a causal LM). A model without that method has none.
    """
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is None:
        return set()
    return {n for n, m in model.named_modules() if m is out}


def select(names, target_modules, *, output_layers=(), required=True):
    """The names that ``target_modules`` selects, in the order given.

    names:          candidate module names (the model's linear layers, in model order)
    output_layers:  names that "all-linear" leaves out (``output_layer_names(model)``)
    required:       raise when nothing is selected, listing what the candidates end in,
                    as PEFT does ("Target modules ... not found in the base model")
    """
    names = list(names)
    targets = expand(target_modules)
    if targets == ALL_LINEAR:
        chosen = [n for n in names if n not in set(output_layers)]
    else:
        chosen = [n for n in names if matches(n, targets)]
    if not chosen and required:
        endings = sorted({n.rpartition(".")[2] for n in names})
        hint = ""
        shorthands = [ALL_LINEAR, *NAMED_SETS]
        if isinstance(targets, str) and targets.lower().replace("_", "-") in shorthands:
            hint = f"; the shorthands are {shorthands}"
        elif isinstance(targets, str) and targets in {n.rpartition(".")[2] for n in names}:
            hint = (f"; a string is a regex matched against the WHOLE name (re.fullmatch), "
                    f"so for the layers named {targets!r} pass a list, [{targets!r}]")
        raise ValueError(
            f"target_modules={target_modules!r} selects none of the {len(names)} linear layers; "
            f"their names end in {endings}{hint}"
        )
    return chosen
