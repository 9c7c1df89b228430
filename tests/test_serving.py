"""lora_ref.serving: the cost of a swap in closed form, the drift of W0 under merge/unmerge cycles
within its bounds, how many adapters fit beside a base model, and the chapter's figures."""

import math

import pytest
import torch

from lora_ref import budget, figures, serving, timing
from lora_ref import torch as lt

LLAMA_8B = budget.load_config("llama-3.1-8b")
# Llama-3.1-8B, one layer: q, o 4096 x 4096; k, v 1024 x 4096; gate, up, down 4096 x 14336 (d k each).
LLAMA_8B_LAYER_DK = 2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336


def test_a_swap_costs_2_d_r_k_macs_about_2r_tokens():
    assert serving.swap_macs(4096, 1024, 16) == 2 * 4096 * 16 * 1024
    d = k = 4096
    r = 16
    token = budget.forward_macs(1, d, k, r, "factored")                    # one token through the layer
    assert 2 * r * (1 - 1e-2) < serving.swap_macs(d, k, r) / token < 2 * r


def test_model_swap_macs_is_2r_times_the_adapted_weights():
    assert serving.model_swap_macs(LLAMA_8B, 16, "all-linear") == 2 * 16 * 32 * LLAMA_8B_LAYER_DK
    assert serving.model_swap_macs(LLAMA_8B, 8, ["q_proj", "v_proj"]) == 2 * 8 * 32 * (4096 * 4096 + 1024 * 4096)


@pytest.mark.parametrize("bad, match", [(dict(r=0), "positive"), (dict(d=0), "positive"), (dict(r=5000), "exceeds")])
def test_swap_macs_refuses_bad_shapes(bad, match):
    args = {**dict(d=4096, k=4096, r=16), **bad}
    with pytest.raises(ValueError, match=match):
        serving.swap_macs(**args)


def _setup(d=32, k=24, r=4, m=3, size=0.05):
    W0 = torch.randn(d, k, generator=torch.Generator().manual_seed(0), dtype=torch.float64) / math.sqrt(k)
    adapters = []
    for j in range(m):
        A, B = lt.init_lora(d, k, r, seed=10 + j, b_std=1.0)
        s = size * float(W0.abs().max()) / float(lt.delta_w(A, B, 1.0).abs().max())   # max|s B A| = size max|W0|
        adapters.append((A, B, s))
    return W0, adapters


def test_swap_drift_does_what_lt_merge_and_lt_unmerge_do():
    """The loop reuses delta_j instead of calling lt.merge / lt.unmerge; the bits are the same."""
    W0, adapters = _setup()
    for dtype in (torch.float32, torch.bfloat16):
        current = W0.to(dtype)
        drift = []
        for j in range(6):
            A, B, s = adapters[j % 3]
            current = lt.unmerge(lt.merge(current, A.to(dtype), B.to(dtype), s), A.to(dtype), B.to(dtype), s)
            drift.append(float((current.double() - W0.to(dtype).double()).abs().max()))
        assert serving.swap_drift(W0, adapters, 6, dtype)["drift"] == drift


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_drift_stays_within_the_entrywise_and_the_a_priori_bounds(dtype):
    W0, adapters = _setup()
    out = serving.swap_drift(W0, adapters, 200, dtype)
    assert out["within"]
    eps = torch.finfo(dtype).eps
    w_max = float(W0.to(dtype).double().abs().max())
    delta_max = max(float(lt.delta_w(A.to(dtype), B.to(dtype), s).double().abs().max()) for A, B, s in adapters)
    for K in (1, 10, 200):
        assert out["drift"][K - 1] <= out["bound"][K - 1] <= serving.swap_drift_bound(K, eps, w_max, delta_max)
    assert out["drift"][-1] > 0                                            # the format does round


def test_one_adapter_merged_and_unmerged_again_and_again_moves_w0_no_further():
    W0, adapters = _setup()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        drift = serving.swap_drift(W0, adapters[:1], 50, dtype)["drift"]
        assert drift[-1] == drift[1] > 0, dtype


def test_swap_drift_bound_closed_form():
    assert serving.swap_drift_bound(0, 2**-7, 1.0, 0.1) == 0
    assert serving.swap_drift_bound(10, 2**-7, 1.0, 0.1) == pytest.approx(((1 + 2**-7) ** 10 - 1) * 1.1, rel=1e-12)
    assert serving.swap_drift_bound(10, 0.5, 1.0, 1e-3) == pytest.approx(2 * 10 * 1e-3)        # 2 K max|delta|
    with pytest.raises(ValueError, match="cycles must be an integer >= 0"):
        serving.swap_drift_bound(-1, 1e-3, 1.0, 0.1)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        serving.swap_drift_bound(1, -1e-3, 1.0, 0.1)


def test_swap_drift_refuses_bad_input():
    W0, adapters = _setup()
    with pytest.raises(ValueError, match="cycles must be a positive integer"):
        serving.swap_drift(W0, adapters, 0, torch.float32)
    with pytest.raises(ValueError, match="at least one adapter"):
        serving.swap_drift(W0, [], 5, torch.float32)


def test_adapters_that_fit_is_the_floor_of_free_memory_over_adapter_size():
    n = budget.base_param_count(LLAMA_8B)
    p = budget.lora_param_count(LLAMA_8B, 16, "all-linear")
    assert p == 41_943_040                                                 # FACTS.md
    memory = 80e9
    assert serving.adapters_that_fit(LLAMA_8B, 16, "all-linear", memory) == math.floor((memory - 2 * n) / (2 * p))
    assert serving.adapters_that_fit(LLAMA_8B, 16, "all-linear", memory, reserved_bytes=40e9) \
        == math.floor((memory - 40e9 - 2 * n) / (2 * p))
    assert serving.adapters_that_fit(LLAMA_8B, 16, "all-linear", 2 * n) == 0          # the base fills it
    assert serving.adapters_that_fit(LLAMA_8B, 16, "all-linear", 1e9) == 0            # the base does not fit
    assert serving.adapters_that_fit(LLAMA_8B, 16, "all-linear", 2 * n + 2 * p) == 1  # exactly one
    with pytest.raises(ValueError, match="adapter_bytes_per_param must be > 0"):
        serving.adapters_that_fit(LLAMA_8B, 16, "all-linear", memory, adapter_bytes_per_param=0)


# --------------------------------------------------------------------------- figures


def _slider_ok(fig, n_steps, n_per_step):
    assert len(fig.data) == n_steps * n_per_step
    steps = fig.layout.sliders[0].steps
    assert len(steps) == n_steps and all(list(s.args[1]) == ["title.text"] for s in steps)


def test_task_arithmetic_figure_has_one_step_per_weight_and_one_bar_set_per_task():
    weights = [0.25, 0.5, 1.0]
    scores = {w: {m: {"date": 0.1 * w, "iso": 0.2 * w} for m in ("cat", "linear", "svd")} for w in weights}
    fig = figures.task_arithmetic_figure(weights, scores, ["date", "iso"], active=1)
    _slider_ok(fig, 3, 2)
    assert list(fig.data[2].x) == ["cat", "linear", "svd"] and list(fig.data[2].y) == [5.0] * 3     # percent
    assert "%" in fig.layout.yaxis.title.text


def test_swap_drift_figure_draws_each_curve_and_its_bound():
    K = list(range(1, 11))
    curves = {"bf16, one adapter": [1e-3] * 10, "bf16, 4 adapters": [1e-3 * k for k in K]}
    bounds = {"bf16": [2e-3 * k for k in K]}
    fig = figures.swap_drift_figure(K, curves, bounds)
    assert [t.name for t in fig.data][:2] == list(curves) and fig.layout.xaxis.type == "log"


def test_multi_adapter_figure_steps_over_m():
    times = {m: {"gathered": [2, 3], "segmented": [1, 2], "padded": [1, 3], "stacked": [m, m], "auto": [m, 3],
                 "per adapter": [m, 2 * m], "merge": [3 * m, 4 * m], "one adapter": [1, 2], "base": [0.5, 1]}
             for m in (1, 4)}
    fig = figures.multi_adapter_figure([8, 64], times)
    _slider_ok(fig, 2, 7)
    assert "takes 1.5× to 4× the time of one adapter" in fig.layout.sliders[0].steps[1].args[1]["title.text"]
    assert "ms" in fig.layout.yaxis.title.text


def test_padding_overhead_counts_the_zeros_every_row_multiplies():
    assert serving.padding_overhead([8, 8, 8]) == 0
    assert serving.padding_overhead([4, 8, 64]) == pytest.approx(1 - (4 + 8 + 64) / (3 * 64), rel=1e-15)
    assert serving.padding_overhead([4, 64], rows=[3, 1]) == pytest.approx(1 - (3 * 4 + 64) / (4 * 64), rel=1e-15)
    with pytest.raises(ValueError, match="one row count per rank"):
        serving.padding_overhead([4, 8], rows=[1])
    with pytest.raises(ValueError, match="no rows"):
        serving.padding_overhead([4, 8], rows=[0, 0])


# --------------------------------------------------------------------------- the second task of the tiny model


def test_the_iso_task_is_the_date_task_backwards_with_disjoint_splits():
    from lora_ref import tiny

    train = tiny.task_examples("train", 5000, seed=0, task="iso")
    test = tiny.task_examples("test", 1000, seed=1, task="iso")
    assert not {p for p, _ in train} & {p for p, _ in test}
    for prompt, answer in train[:200] + test[:200]:
        day, month, year = prompt.removesuffix(" -> ").split("/")
        assert answer == f"{year}-{month}-{day}"
    # a date is held out in both tasks or in neither: the split is a hash of the date
    held_out_dates = {p.removesuffix(" -> ") for p, _ in tiny.task_examples("test", 3000, seed=2, task="date")}
    train_dates = {p.removesuffix(" -> ") for p, _ in tiny.task_examples("train", 5000, seed=2, task="date")}
    assert {a for _, a in test} & held_out_dates and not {a for _, a in test} & train_dates
    assert not {a for _, a in train} & held_out_dates


def test_adding_a_task_left_the_date_task_unchanged():
    """Chapter 08's first examples, and CRC32s of the pairs that the code before the iso task drew."""
    import zlib

    from lora_ref import tiny

    train = tiny.task_examples("train", 2000, seed=0)
    assert train[:3] == [("2037-04-14 -> ", "14/04/2037"), ("2010-05-14 -> ", "14/05/2010"),
                         ("2035-08-06 -> ", "06/08/2035")]
    assert zlib.crc32(repr(train).encode()) == 3413465434
    assert zlib.crc32(repr(tiny.task_examples("test", 500, seed=1)).encode()) == 1297946615


def test_time_single_thread_times_every_callable_on_one_thread_and_restores_the_count():
    before = torch.get_num_threads()
    seen = []
    ms = timing.time_single_thread({"a": lambda: seen.append(torch.get_num_threads()), "b": lambda: sum(range(100))},
                                    reps=2, min_seconds=1e-4)
    assert set(ms) == {"a", "b"} and all(v > 0 for v in ms.values())
    assert set(seen) == {1} and torch.get_num_threads() == before


def test_serving_strategies_compute_the_same_outputs():
    torch.manual_seed(0)
    d, k, n = 16, 12, 10
    As = [torch.randn(r, k, dtype=torch.float64) for r in (2, 4, 3)]
    Bs = [torch.randn(d, r, dtype=torch.float64) for r in (2, 4, 3)]
    x, W0 = torch.randn(n, k, dtype=torch.float64), torch.randn(d, k, dtype=torch.float64)
    index = torch.arange(n) % 3
    fns = serving.serving_strategies(x, W0, As, Bs, [0.5, 2.0, 1.0], index)
    ref = torch.stack([W0 @ x[i] + s * Bs[a] @ (As[a] @ x[i]) for i, (a, s) in
                       enumerate((int(a), [0.5, 2.0, 1.0][int(a)]) for a in index)])
    for name in ("gathered", "segmented", "padded", "stacked", "auto", "per adapter", "merge"):
        torch.testing.assert_close(fns[name](), ref, rtol=0, atol=1e-12, msg=name)
    torch.testing.assert_close(fns["base"](), x @ W0.T)
    torch.testing.assert_close(fns["one adapter"](), x @ W0.T + 0.5 * (x @ As[0].T) @ Bs[0].T, rtol=0, atol=1e-12)
