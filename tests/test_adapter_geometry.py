"""lora_ref.adapter_geometry: the random baselines against Monte Carlo, the phi grid against the
one-pair definition, the per-layer measurements on a short real run, and the shipped sweep."""

import math

import numpy as np
import pytest
import torch

from lora_ref import adapter_geometry as ag
from lora_ref import shipped, spectral, tiny
from lora_ref.tiny import experiments


def _haar(n, m, rng):
    """n x m with orthonormal columns, uniformly distributed (QR of a Gaussian, signs fixed)."""
    Q, R = np.linalg.qr(rng.normal(size=(n, m)))
    return Q * np.sign(np.diag(R))


def test_random_subspace_similarity_is_max_i_j_over_k_by_monte_carlo():
    rng = np.random.default_rng(0)
    k = 64
    for i, j in ((1, 1), (2, 8), (8, 2), (16, 16)):
        U = _haar(k, i, rng)                                        # a fixed subspace
        vals = np.array([np.linalg.norm(U.T @ _haar(k, j, rng)) ** 2 / min(i, j) for _ in range(2000)])
        mean, se = vals.mean(), vals.std(ddof=1) / math.sqrt(vals.size)
        assert abs(mean - ag.random_subspace_similarity(i, j, k)) < 5 * se, (i, j, mean, se)
    assert ag.random_subspace_similarity(8, 64, 128) == 0.5


def test_random_subspace_similarity_matches_phi_of_random_a_matrices():
    """The closed form is what subspace_similarity gives on Gaussian A's (their row spaces are Haar)."""
    rng = np.random.default_rng(1)
    k, i, j = 100, 3, 10
    vals = np.array([spectral.subspace_similarity(rng.normal(size=(i, k)), rng.normal(size=(j, k)), i, j)
                     for _ in range(1000)])
    assert abs(vals.mean() - ag.random_subspace_similarity(i, j, k)) < 5 * vals.std(ddof=1) / math.sqrt(vals.size)


def test_random_projected_norm_is_the_rms_over_random_directions():
    rng = np.random.default_rng(2)
    d, k, r = 30, 20, 4
    W0 = rng.normal(size=(d, k)) * np.linspace(3, 0.1, k)             # an uneven spectrum
    sq = np.array([np.linalg.norm(_haar(d, r, rng).T @ W0 @ _haar(k, r, rng)) ** 2 for _ in range(4000)])
    mean, se = sq.mean(), sq.std(ddof=1) / math.sqrt(sq.size)
    assert abs(mean - ag.random_projected_norm(np.linalg.norm(W0), d, k, r) ** 2) < 5 * se
    # the same through projected_norm on a random matrix's singular vectors (the paper's "Random" row)
    via_table = np.array([spectral.projected_norm(W0, rng.normal(size=(d, k)), r) ** 2 for _ in range(2000)])
    assert abs(via_table.mean() - ag.random_projected_norm(np.linalg.norm(W0), d, k, r) ** 2) < \
        5 * via_table.std(ddof=1) / math.sqrt(2000)


def test_random_projected_norm_reproduces_table_7s_random_row():
    """GPT-3's W_q (12288 x 12288, ||W_q||_F = 61.95): r ||W||_F / sqrt(d k) is 0.0202 at r = 4 and 0.323 at
    r = 64, the table's 0.02 and 0.33 (one random draw each) to within 3%."""
    assert round(ag.random_projected_norm(61.95, 12288, 12288, 4), 4) == 0.0202
    assert round(ag.random_projected_norm(61.95, 12288, 12288, 64), 3) == 0.323
    assert ag.random_projected_norm(4.0, 4, 4, 2) == 2.0                      # 2 * 4 / sqrt(16), exact


def test_similarity_grid_equals_subspace_similarity_entry_by_entry():
    rng = np.random.default_rng(3)
    A1, A2 = rng.normal(size=(6, 20)), rng.normal(size=(9, 20))
    grid = ag.similarity_grid(A1, A2, 6, 9)
    assert grid.shape == (6, 9)
    for i in range(1, 7):
        for j in range(1, 10):
            assert grid[i - 1, j - 1] == pytest.approx(spectral.subspace_similarity(A1, A2, i, j), abs=1e-12)
    assert np.all((grid >= -1e-12) & (grid <= 1 + 1e-12))


def test_similarity_grid_of_an_adapter_with_itself_is_one():
    A = np.random.default_rng(4).normal(size=(8, 30))
    np.testing.assert_allclose(ag.similarity_grid(A, A, 8, 8), 1.0, atol=1e-12)


def test_rank_correlation_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    x = [41, 45, 43, 22, 32, 32, 29, 34, 33, 22, 23, 21, 2]
    y = [3.80, 2.74, 3.13, 2.24, 2.20, 2.66, 3.19, 2.42, 2.91, 2.42, 2.45, 2.69, 1.87]
    assert ag.rank_correlation(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert ag.rank_correlation([1, 2, 3], [30, 20, 10]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="same length"):
        ag.rank_correlation([1, 2, 3], [1, 2])


def test_baselines_bad_input():
    with pytest.raises(ValueError, match=r"do not fit in R\^k with k=10"):
        ag.random_subspace_similarity(4, 11, 10)
    with pytest.raises(ValueError, match=r"i must be a positive integer"):
        ag.random_subspace_similarity(0, 1, 10)
    with pytest.raises(ValueError, match=r"r=5 exceeds min\(d, k\)"):
        ag.random_projected_norm(1.0, 4, 6, 5)
    with pytest.raises(ValueError, match=r"w0_fro is a norm"):
        ag.random_projected_norm(-1.0, 4, 6, 2)
    with pytest.raises(ValueError, match=r"i=7 must be in \[1, 6\]"):
        ag.similarity_grid(np.ones((6, 10)), np.ones((6, 10)), 7, 2)


def test_measure_update_on_a_planted_update():
    rng = np.random.default_rng(5)
    W0 = rng.normal(size=(40, 30)) * 0.1
    u, v = rng.normal(size=40), rng.normal(size=30)
    dW = 20.0 * np.outer(u / np.linalg.norm(u), v / np.linalg.norm(v))      # one strong new direction
    m = ag.measure_update(W0, dW, r=1)
    assert m["erank"] == pytest.approx(1.0) and m["fro"] == pytest.approx(20.0)
    assert list(m["amplification"]) == [] and m["intruders"] == [0]           # r=1 < 4: no amplification read
    m4 = ag.measure_update(W0, dW + 1e-3 * rng.normal(size=(40, 30)), r=4)
    assert list(m4["amplification"]) == [4] and m4["amplification"][4] > 1


def test_fine_tune_and_measure_runs_the_standard_recipe():
    base = tiny.load_tiny_llama()
    out = experiments.fine_tune_and_measure(4, seed=0, base=base, task_scores=False, steps=3)
    assert len(out["layers"]) == 7 * tiny.CONFIG["num_hidden_layers"] == len(out["A"])
    q = out["layers"]["model.layers.0.self_attn.q_proj"]
    assert 1.0 <= q["erank"] <= 4.0 and list(q["amplification"]) == [4]
    assert out["A"]["model.layers.0.self_attn.q_proj"].shape == (4, 128)
    assert set(out["scores"]) == {"text_loss_per_byte"} and set(out["dw"]) == set(out["layers"])
    # the same run through lora_ref.tiny directly gives the same updates
    model, _ = tiny.standard_fine_tune(4, seed=0, base=base, steps=3)
    dw = tiny.weight_updates(base, model)["model.layers.0.self_attn.q_proj"]
    assert spectral.effective_rank(dw) == pytest.approx(q["erank"], rel=1e-9)
    assert torch.is_tensor(dw)


# --------------------------------------------------------------------------- the shipped sweep


@pytest.fixture(scope="module")
def sweep():
    return shipped.load("ch07_adapters")


def test_shipped_sweep_has_every_run_and_layer(sweep):
    S = sweep["settings"]
    assert S["ranks"] == [4, 8, 16, 64] and S["seeds"] == [0, 1, 2]
    assert set(sweep["runs"]) == {f"r{r}_s{s}" for r in S["ranks"] for s in S["seeds"]} | {"full_s0"}
    for name, run in sweep["runs"].items():
        assert len(run["layers"]) == 28, name
        for layer in run["layers"].values():
            assert 1.0 <= layer["erank"] and all(0 <= j < S["top_k"] for j in layer["intruders"])
            assert layer["intruders"] == [j for j, c in enumerate(layer["overlap"]) if c < S["eps"]]


def test_shipped_sweep_erank_is_below_r(sweep):
    for name, run in sweep["runs"].items():
        if name.startswith("r"):
            r = int(name[1:].split("_")[0])
            assert all(layer["erank"] <= r + 1e-9 for layer in run["layers"].values()), name


def test_shipped_grids_are_similarities(sweep):
    for frame in sweep["grids"]:
        for key in ("r8_r64", "seeds_r64"):
            g = np.array(frame[key])                                    # hundredths of phi
            assert g.dtype.kind == "i" and np.all((g >= 0) & (g <= 100)), (frame["layer"], key)
            assert abs(g[0, 0] / 100 - sweep["phi_diagonal"][frame["layer"]][key][0]) <= 0.005
        assert np.array(frame["r8_r64"]).shape == (8, 64) and np.array(frame["seeds_r64"]).shape == (64, 64)


def test_shipped_sweep_keeps_the_loss_curve_of_the_run_the_chapter_reruns(sweep):
    run = sweep["runs"][sweep["settings"]["live_run"]]
    assert len(run["losses"]) == sweep["recipe"]["steps"] and run["losses"][-1] == run["loss"]


# --------------------------------------------------------------------------- the chapter's figures


def test_subspace_similarity_figure_switches_two_heatmaps_per_layer():
    from lora_ref import figures

    rng = np.random.default_rng(6)
    frames = [(f"{n}.q_proj", rng.uniform(size=(8, 64)), rng.uniform(size=(64, 64)), f"layer {n}") for n in range(3)]
    fig = figures.subspace_similarity_figure(frames, "left", "right", active=1)
    assert len(fig.data) == 6 and [t.visible for t in fig.data] == [False, False, True, True, False, False]
    steps = fig.layout.sliders[0].steps
    assert [list(s.args[1]) for s in steps] == [["title.text"]] * 3 and fig.layout.title.text == "layer 1"
    left = np.asarray(fig.data[2].z)
    assert left.shape == (8, 64) and left.max() <= 100
    np.testing.assert_array_equal(left, np.rint(100 * frames[1][1]))          # phi in hundredths
    assert fig.data[3].xaxis == "x2" and fig.layout.yaxis.autorange == "reversed"


def test_effective_rank_and_intruder_figures_label_their_axes_and_state_a_finding():
    from lora_ref import figures

    fig = figures.effective_rank_figure({"r = 4": [3.0, 3.5], "r = 64": [10.0, 11.0], "full": [40.0, 60.0]},
                                        {"r = 4": 3.9, "r = 64": 55.0})
    assert fig.layout.yaxis.type == "log" and "effective rank" in fig.layout.yaxis.title.text
    assert "r = 64" in fig.layout.title.text and "full" in fig.layout.title.text
    points = [("r = 4", 0, 41, 3.8), ("r = 4", 1, 45, 2.7), ("full", 0, 2, 1.9)]
    fig = figures.intruders_forgetting_figure(points, 0.575)
    assert "intruder" in fig.layout.xaxis.title.text and "nats per byte" in fig.layout.yaxis.title.text
    assert "full, 1.90 nats/byte) has 2 intruders" in fig.layout.title.text and "41 to 45" in fig.layout.title.text


def test_similarity_over_random_is_one_for_random_factors_and_above_for_shared_ones():
    rng = np.random.default_rng(2)
    k = 128
    medians = [ag.similarity_over_random(ag.similarity_grid(rng.normal(size=(8, k)), rng.normal(size=(64, k)), 8, 64), k)
               for _ in range(20)]
    assert abs(np.mean(medians) - 1) < 0.05                      # random subspaces: the baseline itself
    shared = rng.normal(size=(8, k))
    A64 = np.vstack([shared, rng.normal(size=(56, k))])          # A at r = 64 contains A at r = 8's row space
    assert ag.similarity_over_random(ag.similarity_grid(shared, A64, 8, 64), k) > 2
    with pytest.raises(ValueError, match="j_from"):
        ag.similarity_over_random(np.ones((8, 10)), k, j_from=17)
