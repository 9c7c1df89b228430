"""The standard fine-tunes shared by the chapters: lora_ref.tiny.runs."""

import copy

import pytest
import torch

from lora_ref import tiny
from lora_ref import torch as lt


@pytest.fixture(scope="module")
def base():
    return tiny.load_tiny_llama()


def test_lora_weight_updates_equal_the_merged_weight_minus_w0(base):
    model, _ = tiny.standard_fine_tune(4, base=base, steps=3)
    dw = tiny.weight_updates(base, model)
    merged = lt.merge_lora(copy.deepcopy(model))           # an independent route to W0 + s B A
    for name, delta in dw.items():
        w = merged.get_submodule(name).weight.double() - base.get_submodule(name).weight.double()
        torch.testing.assert_close(delta, w, rtol=0, atol=1e-6)
    assert any(float(d.abs().max()) > 0 for d in dw.values()), "3 steps must move B away from 0"


def test_full_and_lora_updates_share_layer_names_and_shapes(base):
    full, _ = tiny.standard_fine_tune(None, base=base, steps=2)
    lora, _ = tiny.standard_fine_tune(2, base=base, steps=2)
    d_full, d_lora = tiny.weight_updates(base, full), tiny.weight_updates(base, lora)
    assert list(d_full) == list(d_lora) and len(d_full) == 7 * tiny.CONFIG["num_hidden_layers"]
    assert all(d_full[n].shape == d_lora[n].shape for n in d_full)
    assert all(torch.linalg.matrix_rank(d).item() <= 2 for d in d_lora.values())


def test_standard_fine_tune_leaves_the_base_untouched_and_uses_the_recipe(base):
    before = {n: p.clone() for n, p in base.named_parameters()}
    model, run = tiny.standard_fine_tune(8, base=base, steps=2)
    assert all(torch.equal(p, before[n]) for n, p in base.named_parameters())
    layer = next(iter(lt.lora_modules(model).values()))
    assert layer.scaling == tiny.RECIPE.lora_alpha / 8 and len(run["losses"]) == 2


@pytest.mark.parametrize("r", [0, -1, 2.5, "8"])
def test_standard_fine_tune_rejects_a_rank_that_is_not_a_positive_int(r, base):
    with pytest.raises(ValueError, match="positive int"):
        tiny.standard_fine_tune(r, base=base, steps=1)


def test_evaluate_scores_the_base_as_unable_to_do_the_task(base):
    scores = tiny.evaluate(base)
    assert scores["exact_match"] == 0.0 and scores["loss_per_byte"] > 3.0
    assert scores["text_loss_per_byte"] < 1.5      # the pretraining text it models well
