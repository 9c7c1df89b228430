"""One target_modules rule, PEFT's, for add_lora, adapters and budget (lora_ref.targets)."""

import copy

import pytest
from peft import LoraConfig, get_peft_model

from lora_ref import adapters, targets
from lora_ref import torch as lt

SPECS = [
    ["q_proj", "v_proj"],                          # names: equality or suffix
    ["self_attn.q_proj", "mlp.down_proj"],         # dotted suffixes
    ["model.layers.1.self_attn.o_proj"],           # one full name
    ["lm_head"],                                   # the output layer, when asked for by name
    r".*\.(q|v)_proj",                             # a regex, matched against the whole name
    r"model\.layers\.0\.(self_attn|mlp)\.\w+_proj",  # every linear layer of layer 0
    "all-linear",                                  # every linear layer but lm_head
    "ALL-LINEAR",                                  # PEFT compares the shorthand case-insensitively
]


def _peft_selection(model, spec):
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=2, lora_alpha=4, target_modules=spec))
    prefix = "base_model.model."
    return [n.removeprefix(prefix) for n, m in peft_model.named_modules()
            if hasattr(m, "lora_A") and "default" in m.lora_A]


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_selection_equals_peft_selection(tiny_llama, spec):
    ours = lt.target_names(tiny_llama, spec)
    assert ours == _peft_selection(tiny_llama, spec)
    assert ours == adapters._selected(tiny_llama, spec)          # the file format reads the same rule


@pytest.mark.parametrize("name, names", sorted(targets.NAMED_SETS.items()))
def test_named_sets_select_what_their_lists_select(tiny_llama, name, names):
    assert lt.target_names(tiny_llama, name) == _peft_selection(tiny_llama, list(names))


def test_add_lora_accepts_named_sets_like_budget(tiny_llama):
    model = lt.add_lora(copy.deepcopy(tiny_llama), "qv", r=2, alpha=4)
    assert sorted({n.rpartition(".")[2] for n in lt.lora_modules(model)}) == ["q_proj", "v_proj"]


def test_a_bare_name_as_a_string_is_a_regex_and_selects_nothing_as_in_peft(tiny_llama):
    with pytest.raises(ValueError, match="not found"):
        _peft_selection(tiny_llama, "q_proj")
    with pytest.raises(ValueError, match=r"regex.*WHOLE name.*\['q_proj'\]"):
        lt.target_names(tiny_llama, "q_proj")


def test_no_match_names_what_the_layers_end_in(tiny_llama):
    with pytest.raises(ValueError, match=r"selects none of the 15 linear layers.*'gate_proj'"):
        lt.add_lora(tiny_llama, ["qkv"], r=2, alpha=4)


@pytest.mark.parametrize("bad, err", [([], ValueError), ("", ValueError), ([""], ValueError), ([3], ValueError),
                                      ("q_proj(", ValueError), (7, TypeError)])
def test_bad_target_modules_raise_naming_the_value(bad, err):
    with pytest.raises(err, match="target_modules"):
        targets.expand(bad)


def test_matches_is_name_or_suffix_for_lists_and_fullmatch_for_strings():
    assert targets.matches("model.layers.0.self_attn.q_proj", ("q_proj",))
    assert not targets.matches("model.layers.0.self_attn.xq_proj", ("q_proj",))   # suffix after a dot only
    assert targets.matches("q_proj", ("q_proj",))
    assert not targets.matches("model.layers.0.self_attn.q_proj", "q_proj")
    assert targets.matches("model.layers.0.self_attn.q_proj", r".*q_proj")
