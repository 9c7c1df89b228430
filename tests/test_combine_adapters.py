"""lora_ref.adapters.combine_adapters against PEFT's add_weighted_adapter: the same update in every
layer for "cat", "linear" and "svd", a file PEFT loads, the closed forms of chapter 09, and bad input
that raises before anything is written."""

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file

from lora_ref import spectral
from lora_ref.adapters import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    combine_adapters,
    combine_factors,
    read_adapter_factors,
    task_arithmetic_delta,
)

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

QV = ["q_proj", "v_proj"]


@pytest.fixture
def adapters(peft_adapter, tmp_path):
    """Three plain-LoRA adapters on q_proj and v_proj: a (r=4, alpha=8), b (r=4, alpha=12), c (r=2, alpha=6)."""
    return {name: peft_adapter(tmp_path / name, r, alpha, seed)
            for name, r, alpha, seed in (("a", 4, 8, 1), ("b", 4, 12, 2), ("c", 2, 6, 3))}


def _peft_deltas(model, adapter):
    """{layer name: Delta W of ``adapter``} over every LoRA layer of a PeftModel, float64."""
    out = {}
    for name, module in model.base_model.model.named_modules():
        if hasattr(module, "lora_A") and adapter in module.lora_A:
            out[name] = module.get_delta_weight(adapter).double()
    return out


def _peft_combination(make, dirs, weights, combination_type, svd_rank=None):
    model = PeftModel.from_pretrained(make(), dirs[0], adapter_name="x0")
    for i, d in enumerate(dirs[1:], 1):
        model.load_adapter(d, adapter_name=f"x{i}")
    model.add_weighted_adapter([f"x{i}" for i in range(len(dirs))], weights, "combined",
                               combination_type=combination_type, svd_rank=svd_rank)
    return _peft_deltas(model, "combined")


def _ours(make, dirs, weights, out, combination_type, svd_rank=None):
    combine_adapters(dirs, weights, out, combination_type=combination_type, svd_rank=svd_rank)
    return _peft_deltas(PeftModel.from_pretrained(make(), out), "default")


CASES = [
    ("cat", "abc", [0.7, -0.4, 1.3], None),
    ("cat", "ac", [1.0, 1.0], None),
    ("linear", "ab", [0.7, 0.5], None),
    ("linear", "ab", [1.0, -0.6], None),          # PEFT 0.21.2 puts the sign on A only
    ("svd", "abc", [0.7, -0.4, 1.3], None),
    ("svd", "abc", [0.7, -0.4, 1.3], 3),
    ("svd", "ac", [1.0, 2.0], 6),                 # the full rank of the sum: exact
]


@pytest.mark.parametrize("combination_type, names, weights, svd_rank", CASES)
def test_every_layer_has_the_delta_w_of_peft_add_weighted_adapter(make_tiny_llama, adapters, tmp_path,
                                                                  combination_type, names, weights, svd_rank):
    dirs = [adapters[n] for n in names]
    theirs = _peft_combination(make_tiny_llama, dirs, weights, combination_type, svd_rank)
    ours = _ours(make_tiny_llama, dirs, weights, tmp_path / "out", combination_type, svd_rank)
    assert set(ours) == set(theirs) and len(ours) == 2 * 2              # q_proj, v_proj in 2 layers
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6 * float(theirs[name].abs().max()))
    config = json.loads((tmp_path / "out" / CONFIG_NAME).read_text())
    ranks = {"a": 4, "b": 4, "c": 2}
    expected_r = {"cat": sum(ranks[n] for n in names), "linear": 4, "svd": svd_rank or max(ranks[n] for n in names)}
    assert config["r"] == config["lora_alpha"] == expected_r[combination_type]
    assert config["use_rslora"] is False and config["peft_type"] == "LORA"


def _layer_factors(dirs):
    """[(config, {layer: (A, B)})] and the scalings s_i = alpha_i / r_i."""
    read = [read_adapter_factors(d) for d in dirs]
    return read, [c["lora_alpha"] / c["r"] for c, _ in read]


def test_cat_is_the_exact_weighted_sum_and_its_rank_is_the_sum_of_ranks(adapters):
    read, s = _layer_factors([adapters["a"], adapters["c"]])
    for name in read[0][1]:
        As, Bs = [f[name][0] for _, f in read], [f[name][1] for _, f in read]
        A, B = combine_factors(As, Bs, s, [0.5, -2.0], "cat")
        assert A.shape == (4 + 2, As[0].shape[1]) and B.shape == (Bs[0].shape[0], 4 + 2)
        expected = 0.5 * s[0] * Bs[0].double() @ As[0].double() - 2.0 * s[1] * Bs[1].double() @ As[1].double()
        torch.testing.assert_close(B @ A, expected, rtol=0, atol=1e-12)


def test_linear_adds_the_cross_terms_of_eq_ch09_linear(adapters):
    """(sqrt c1 B1 + sqrt c2 B2)(sqrt c1 A1 + sqrt c2 A2) = c1 B1 A1 + c2 B2 A2 + sqrt(c1 c2) (B1 A2 + B2 A1)."""
    read, s = _layer_factors([adapters["a"], adapters["b"]])
    w = [0.7, 0.5]
    c = [wi * si for wi, si in zip(w, s)]
    for name in read[0][1]:
        (A1, B1), (A2, B2) = ((f[name][0].double(), f[name][1].double()) for _, f in read)
        A, B = combine_factors([A1, A2], [B1, B2], s, w, "linear")
        cross = math.sqrt(c[0] * c[1]) * (B1 @ A2 + B2 @ A1)
        torch.testing.assert_close(B @ A - task_arithmetic_delta([A1, A2], [B1, B2], s, w), cross, rtol=0, atol=1e-12)
        assert cross.norm() > 0.1 * (B @ A).norm()                       # not a rounding effect


def test_linear_is_the_weighted_sum_exactly_when_its_cross_terms_cancel():
    """prop-ch09-linear (1): large cross terms cancel for one sign of omega_2 and add for the other.

    B2 = B1 and A2 = -A1: sgn(w2) B1 A2 + sgn(w1) B2 A1 = 0 for w1, w2 > 0, so linear is the weighted
    sum although each cross term is as large as an update; with w2 < 0 they add up instead."""
    g = torch.Generator().manual_seed(4)
    A1, B1 = torch.randn(3, 10, generator=g, dtype=torch.float64), torch.randn(7, 3, generator=g, dtype=torch.float64)
    As, Bs, s = [A1, -A1], [B1, B1.clone()], [2.0, 2.0]
    for w, cancels in (([0.7, 0.3], True), ([0.7, -0.3], False)):
        A, B = combine_factors(As, Bs, s, w, "linear")
        gap = (B @ A - task_arithmetic_delta(As, Bs, s, w)).norm() / (B1 @ A1).norm()
        assert (gap < 1e-12) if cancels else (gap > 0.5), (w, float(gap))


def test_svd_is_the_best_rank_q_approximation_of_the_weighted_sum(adapters):
    read, s = _layer_factors([adapters[n] for n in "abc"])
    w = [0.7, -0.4, 1.3]
    for name in read[0][1]:
        As, Bs = [f[name][0] for _, f in read], [f[name][1] for _, f in read]
        total = task_arithmetic_delta(As, Bs, s, w)
        for q in (1, 3, 4):
            A, B = combine_factors(As, Bs, s, w, "svd", svd_rank=q)
            assert A.shape == (q, As[0].shape[1])
            torch.testing.assert_close(B @ A, torch.from_numpy(spectral.best_rank_r(total, q)), rtol=0, atol=1e-10)
            err = float((total - B @ A).norm())
            assert math.isclose(err, spectral.eckart_young_error(total, q), rel_tol=1e-9)


def test_one_adapter_is_combined_linearly_as_in_peft(make_tiny_llama, adapters, tmp_path):
    theirs = _peft_combination(make_tiny_llama, [adapters["a"]], [0.5], "svd", svd_rank=1)
    ours = _ours(make_tiny_llama, [adapters["a"]], [0.5], tmp_path / "out", "svd", svd_rank=1)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-7)
    assert read_adapter_factors(tmp_path / "out")[0]["r"] == 4              # svd_rank ignored, as in PEFT


def test_rslora_adapters_combine_to_the_weighted_sum_where_peft_overscales(make_tiny_llama, peft_adapter, tmp_path):
    """PEFT 0.21.2 copies use_rslora into the combined config, so its scale is q / sqrt(q) = sqrt(q), not 1
    (fixed upstream in PR #3449). Ours keeps the weighted sum; if PEFT is fixed, the second assert says so."""
    d = peft_adapter(tmp_path / "rs", r=4, alpha=8, seed=5, rslora=True)
    own = _peft_deltas(PeftModel.from_pretrained(make_tiny_llama(), d), "default")
    ours = _ours(make_tiny_llama, [d], [1.0], tmp_path / "out", "linear")
    theirs = _peft_combination(make_tiny_llama, [d], [1.0], "linear")
    for name in own:
        torch.testing.assert_close(ours[name], own[name], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(theirs[name], math.sqrt(4) * own[name], rtol=1e-5, atol=1e-7)


def test_output_is_in_the_input_dtype_and_loads_into_lora_ref(make_tiny_llama, adapters, tmp_path):
    from lora_ref.adapters import load_adapter

    combine_adapters([adapters["a"], adapters["c"]], [1.0, 1.0], tmp_path / "out", "cat")
    tensors = load_file(tmp_path / "out" / WEIGHTS_NAME)
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    model = load_adapter(make_tiny_llama(), tmp_path / "out")
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "out")
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, peft_model(input_ids=ids).logits, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- bad input


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in Path(root).rglob("*"))


def _refused(root, dirs, weights, out, exc, match, **kwargs):
    before = _listing(root)
    with pytest.raises(exc, match=match):
        combine_adapters(dirs, weights, out, **kwargs)
    assert _listing(root) == before, "a refused combination wrote something"


@pytest.mark.parametrize("weights, kwargs, match", [
    ([1.0, math.nan], {}, r"weights\[1\] must be a finite number, got nan"),
    ([math.inf, 1.0], {}, r"weights\[0\] must be a finite number"),
    ([True, 1.0], {}, r"weights\[0\] must be a finite number, got True"),
    ([1.0], {}, r"weights must be a list of 2 numbers"),
    ([1.0, 1.0], {"combination_type": "ties"}, r"combination_type must be one of \('cat', 'linear', 'svd'\)"),
    ([1.0, 1.0], {"combination_type": "svd", "svd_rank": 0}, r"svd_rank must be None or an integer in \[1, min\(d, k\)\] = \[1, 16\]"),
    ([1.0, 1.0], {"combination_type": "svd", "svd_rank": 17}, r"= \[1, 16\], got 17"),
    ([1.0, 1.0], {"combination_type": "svd", "svd_rank": 2.0}, r"svd_rank must be None or an integer"),
    ([1.0, 1.0], {"combination_type": "cat", "svd_rank": 2}, r"svd_rank=2 is only used by combination_type='svd'"),
    ([1.0, 1.0], {"combination_type": "linear"}, r"all ranks must be equal, got r = \[4, 2\]"),
    ([1e300, 1.0], {"combination_type": "cat"}, r"non-finite value"),
])
def test_bad_arguments_raise_and_write_nothing(adapters, tmp_path, weights, kwargs, match):
    _refused(tmp_path, [adapters["a"], adapters["c"]], weights, tmp_path / "out", ValueError, match, **kwargs)


def test_adapters_on_different_layers_are_refused(peft_adapter, adapters, tmp_path):
    other = peft_adapter(tmp_path / "qk", 4, 8, 7, targets=["q_proj", "k_proj"])
    _refused(tmp_path, [adapters["a"], other], [1.0, 1.0], tmp_path / "out", ValueError,
             r"adapters must adapt the same layers: .* has \[.*v_proj.*\] that .* lacks")


def test_adapters_of_different_shapes_are_refused(peft_adapter, adapters, tmp_path):
    other = peft_adapter(tmp_path / "wide", 4, 8, 7, hidden_size=16, intermediate_size=32)
    _refused(tmp_path, [adapters["a"], other], [1.0, 1.0], tmp_path / "out", ValueError,
             r"updates a \(\d+, 16\) weight but .* a \(\d+, 32\) weight")


def test_adapters_of_different_base_models_are_refused(adapters, tmp_path):
    for name, base in (("a", "org/model-1"), ("b", "org/model-2")):
        file = adapters[name] / CONFIG_NAME
        file.write_text(json.dumps(dict(json.loads(file.read_text()), base_model_name_or_path=base)))
    _refused(tmp_path, [adapters["a"], adapters["b"]], [1.0, 1.0], tmp_path / "out", ValueError,
             r"different base models: \['org/model-1', 'org/model-2'\]")


def test_a_mix_of_list_and_regex_targets_is_refused(adapters, tmp_path):
    file = adapters["b"] / CONFIG_NAME
    file.write_text(json.dumps(dict(json.loads(file.read_text()), target_modules=r".*\.(q|v)_proj")))
    _refused(tmp_path, [adapters["a"], adapters["b"]], [1.0, 1.0], tmp_path / "out", ValueError,
             "all lists or all regex strings")


def test_a_broken_input_adapter_is_refused(adapters, tmp_path):
    file = adapters["b"] / WEIGHTS_NAME
    tensors = load_file(file)
    tensors.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight")
    save_file(tensors, file, metadata={"format": "pt"})
    _refused(tmp_path, [adapters["a"], adapters["b"]], [1.0, 1.0], tmp_path / "out", ValueError,
             r"missing key .*layers\.1\.self_attn\.v_proj\.lora_B\.weight")


@pytest.mark.parametrize("paths, match", [([], "non-empty list"), ("a", "non-empty list")])
def test_no_adapters_is_refused(tmp_path, paths, match):
    _refused(tmp_path, paths, [], tmp_path / "out", ValueError, match)


def test_writing_over_an_input_is_refused(adapters, tmp_path):
    _refused(tmp_path, [adapters["a"], adapters["b"]], [1.0, 1.0], adapters["b"], ValueError, "is one of the input")


def test_a_failed_write_leaves_no_file(adapters, tmp_path, monkeypatch):
    from lora_ref import adapters as module

    def fail(tensors, file, metadata=None):
        Path(file).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(module, "save_file", fail)
    _refused(tmp_path, [adapters["a"], adapters["b"]], [1.0, 1.0], tmp_path / "out", OSError, "disk full")
