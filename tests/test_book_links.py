"""Library <-> book: each function that computes a formula of a chapter names it in its
docstring ("Book: eq-ch02-rows (notebooks/02_forward_pass)."), and that label exists there."""

import importlib
import inspect
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOK_LINE = re.compile(r"Book: (?P<labels>[\w-]+(?:, [\w-]+)*) \((?P<page>[\w/]+)\)\.")
MODULES = ["lora_ref.numpy", "lora_ref.torch", "lora_ref.budget", "lora_ref.quant", "lora_ref.spectral",
           "lora_ref.initialization", "lora_ref.rank_scaling", "lora_ref.adapter_geometry",
           "lora_ref.gradient_dynamics", "lora_ref.low_rank", "lora_ref.adapters", "lora_ref.serving",
           "lora_ref.variants", "lora_ref.hyperparams", "lora_ref.parallelism", "lora_ref.distributed"]

# The formulas the chapters show, and the function that computes each. A new chapter adds its rows.
REQUIRED = {
    "lora_ref.numpy.scaling": "eq-ch02-forward",
    "lora_ref.numpy.lora_forward": "eq-ch02-rows",
    "lora_ref.numpy.delta_w": "prop-ch02-rank",
    "lora_ref.numpy.merge": "eq-ch02-merge",
    "lora_ref.numpy.unmerge": "prop-ch02-roundtrip",
    "lora_ref.budget.linear_shapes": "eq-ch01-shapes",
    "lora_ref.budget.base_param_count": "eq-ch01-base",
    "lora_ref.budget.lora_param_count": "eq-ch01-lora",
    "lora_ref.budget.full_finetune_memory": "eq-ch01-full",
    "lora_ref.budget.qlora_memory": "eq-ch01-lora-mem",
    "lora_ref.budget.forward_macs": "eq-ch02-macs",
    "lora_ref.budget.materialise_crossover_tokens": "eq-ch02-crossover",
    "lora_ref.numpy.delta_w_sgd_step": "eq-ch03-sgd-step",
    "lora_ref.rank_scaling.scale_for_rule": "eq-ch03-rules",
    "lora_ref.rank_scaling.equivalent_settings": "prop-ch03-equivalence",
    "lora_ref.rank_scaling.first_step_decrease": "eq-ch03-first-step",
    "lora_ref.rank_scaling.first_step_rank_exponent": "eq-ch03-exponents",
    "lora_ref.rank_scaling.retune_factor": "eq-ch03-exponents",
    "lora_ref.initialization.ba_second_moment": "prop-ch04-var",
    "lora_ref.initialization.a_variance": "eq-ch04-kaiming",
    "lora_ref.initialization.ba_excess_kurtosis": "eq-ch04-kurtosis",
    "lora_ref.initialization.peft_false_ba_variance": "eq-ch04-false",
    "lora_ref.initialization.symmetric_output_rms": "eq-ch04-symmetric",
    "lora_ref.initialization.first_step_delta_y": "eq-ch04-sgd-step",
    "lora_ref.initialization.first_step_size": "eq-ch04-sgd-size",
    "lora_ref.initialization.first_step_exponent": "eq-ch04-exponent",
    "lora_ref.numpy.lora_grads": "eq-ch05-grads",
    "lora_ref.gradient_dynamics.adam_first_step": "eq-ch05-adam-a",
    "lora_ref.gradient_dynamics.tangent_projection": "eq-ch05-tangent",
    "lora_ref.gradient_dynamics.expressible_fraction": "prop-ch05-projected",
    "lora_ref.gradient_dynamics.step_cosine": "prop-ch05-projected",
    "lora_ref.gradient_dynamics.best_rank_fraction": "eq-ch05-fractions",
    "lora_ref.gradient_dynamics.random_init_fraction_sq": "eq-ch05-fractions",
    "lora_ref.gradient_dynamics.training_macs": "eq-ch05-macs",
    "lora_ref.gradient_dynamics.saved_activations": "eq-ch05-memory",
    "lora_ref.torch.loraplus_optimizer": "eq-ch05-loraplus",
    "lora_ref.spectral.effective_rank": "eq-ch07-erank",
    "lora_ref.spectral.effective_rank_of_spectrum": "eq-ch07-erank",
    "lora_ref.spectral.subspace_similarity": "eq-ch07-phi",
    "lora_ref.spectral.amplification_factor": "eq-ch07-amplification",
    "lora_ref.spectral.intruder_dimensions": "eq-ch07-intruder",
    "lora_ref.adapter_geometry.random_subspace_similarity": "eq-ch07-phi-random",
    "lora_ref.adapter_geometry.random_projected_norm": "eq-ch07-random-projection",
    "lora_ref.low_rank.fit_low_rank": "eq-ch06-gd",
    "lora_ref.low_rank.energy_curve": "eq-ch06-energy",
    "lora_ref.low_rank.rank_for_energy": "eq-ch06-energy",
    "lora_ref.low_rank.critical_loss": "eq-ch06-critical",
    "lora_ref.low_rank.truncate_updates": "eq-ch06-truncate",
    "lora_ref.adapters.task_arithmetic_delta": "eq-ch09-cat",
    "lora_ref.adapters.combine_factors": "eq-ch09-linear",
    "lora_ref.numpy.batched_lora_forward": "eq-ch09-batched",
    "lora_ref.numpy.pad_adapters": "eq-ch09-padding",
    "lora_ref.serving.padding_overhead": "eq-ch09-padding",
    "lora_ref.serving.swap_macs": "eq-ch09-swap",
    "lora_ref.serving.swap_drift": "prop-ch09-drift",
    "lora_ref.serving.swap_drift_bound": "prop-ch09-drift",
    "lora_ref.serving.adapters_that_fit": "eq-ch09-fit",
    "lora_ref.numpy.pissa_init": "eq-ch10-pissa",
    "lora_ref.numpy.milora_init": "eq-ch10-pissa",
    "lora_ref.numpy.pissa_to_lora": "prop-ch10-conversion",
    "lora_ref.numpy.dora_forward": "eq-ch10-dora",
    "lora_ref.numpy.dora_grads": "eq-ch10-dora-grads",
    "lora_ref.numpy.vera_forward": "eq-ch10-vera",
    "lora_ref.numpy.loraga_init": "prop-ch10-loraga",
    "lora_ref.variants.trainable_params": "eq-ch10-counts",
    "lora_ref.variants.init_race": "prop-ch10-saddle",
    "lora_ref.variants.magnitude_direction_change": "eq-ch10-md",
    "lora_ref.variants.adalora_triplet_scores": "eq-ch10-adalora-score",
    "lora_ref.hyperparams.dropout_moments": "eq-ch11-dropout-moments",
    "lora_ref.hyperparams.dropout_penalty": "eq-ch11-dropout-penalty",
    "lora_ref.hyperparams.dropout_b_grad_noise": "eq-ch11-dropout-grad",
    "lora_ref.hyperparams.step_size": "eq-ch11-step-size",
    "lora_ref.hyperparams.predicted_lr": "eq-ch11-predicted-lr",
    "lora_ref.hyperparams.lr_optimum": "eq-ch11-lr-optimum",
    "lora_ref.hyperparams.equal_budget_ranks": "eq-ch11-equal-budget",
    "lora_ref.parallelism.ddp_grad_bytes": "eq-ch12-ddp-bytes",
    "lora_ref.parallelism.ring_allreduce_bytes": "eq-ch12-ring",
    "lora_ref.parallelism.fsdp_gather_bytes": "eq-ch12-fsdp-gather",
    "lora_ref.parallelism.memory_per_gpu": "eq-ch12-memory",
    "lora_ref.parallelism.training_flops": "eq-ch12-time",
    "lora_ref.parallelism.step_time": "eq-ch12-time",
}


def _labels(page):
    """Equation, proposition and exercise labels defined on a page (.ipynb or .md)."""
    path = next(p for p in (ROOT / f"{page}.ipynb", ROOT / f"{page}.md") if p.exists())
    text = path.read_text()
    if path.suffix == ".ipynb":
        text = "\n".join("".join(c["source"]) for c in json.loads(text)["cells"] if c["cell_type"] == "markdown")
    return set(re.findall(r"\$\$ \(([\w-]+)\)", text)) | set(re.findall(r":label: ([\w-]+)", text))


def _public_functions():
    for name in MODULES:
        module = importlib.import_module(name)
        for attr in getattr(module, "__all__", []):
            obj = getattr(module, attr)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield f"{name}.{attr}", inspect.getdoc(obj) or ""


DOCS = dict(_public_functions())


@pytest.mark.parametrize("name", sorted(n for n, d in DOCS.items() if "Book:" in d))
def test_every_book_reference_names_a_label_that_exists(name):
    refs = _references(DOCS[name])
    assert refs, f"{name}: a 'Book:' line must read 'Book: eq-..., prop-... (notebooks/NN_topic).'"
    missing = _missing(refs)
    assert not missing, f"{name} cites labels its page does not define: {missing}"


def _references(doc):
    """[(labels, page)] of the 'Book:' lines of a docstring."""
    return BOOK_LINE.findall(doc.replace("\n", " "))


def _missing(refs):
    """The cited labels that their page does not define."""
    return sorted(label for labels, page in refs for label in set(labels.split(", ")) - _labels(page))


@pytest.mark.parametrize("name, label", sorted(REQUIRED.items()))
def test_each_formula_of_the_chapters_is_linked_from_its_function(name, label):
    assert name in DOCS, f"{name} is not public"
    assert any(label in labels.split(", ") for labels, _ in BOOK_LINE.findall(DOCS[name].replace("\n", " "))), \
        f"{name}'s docstring does not name {label}"


def test_the_rule_rejects_a_label_that_does_not_exist_and_a_malformed_line():
    doc = "Book: eq-ch02-rows, eq-ch02-nonexistent (notebooks/02_forward_pass)."
    assert _missing(_references(doc)) == ["eq-ch02-nonexistent"]
    assert _missing(_references("Book: eq-ch02-rows (notebooks/02_forward_pass).")) == []
    assert _references("Book: eq-ch02-rows in notebooks/02_forward_pass") == []
