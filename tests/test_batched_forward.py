"""batched_lora_forward and pad_adapters: a mixed batch equals a loop over its rows, in both backends
alike; padding to a larger rank changes nothing; a model serving three adapters at once gives PEFT's
mixed-batch logits (``adapter_names=``); bad shapes and indices get errors that name them; and the
benchmark runs (a smoke test)."""

import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lora_ref import numpy as ln
from lora_ref import serving
from lora_ref import torch as lt

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def _case(seed, n=9, d=5, k=7, ranks=(1, 3, 2)):
    rng = np.random.default_rng(seed)
    As = [rng.normal(size=(r, k)) for r in ranks]
    Bs = [rng.normal(size=(d, r)) for r in ranks]
    return dict(x=rng.normal(size=(n, k)), W0=rng.normal(size=(d, k)), As=As, Bs=Bs,
                s=rng.uniform(0.5, 2.0, size=len(ranks)), index=rng.integers(-1, len(ranks), size=n))


def _row_loop(c):
    """The definition, one row at a time: W0 x_i + s_a B_a (A_a x_i), or W0 x_i for a = -1."""
    rows = []
    for x_i, a in zip(c["x"], c["index"]):
        rows.append(c["W0"] @ x_i if a < 0 else ln.lora_forward(x_i, c["W0"], c["As"][a], c["Bs"][a], c["s"][a]))
    return np.stack(rows)


T = lambda a: torch.from_numpy(np.asarray(a))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_mixed_batch_equals_a_loop_over_rows(seed, backend):
    c = _case(seed)
    c["index"][0] = -1                                                # a row for the base model
    if backend == "numpy":
        A, B = ln.pad_adapters(c["As"], c["Bs"])
        y = ln.batched_lora_forward(c["x"], c["W0"], A, B, c["s"], c["index"])
    else:
        A, B = lt.pad_adapters([T(a) for a in c["As"]], [T(b) for b in c["Bs"]])
        y = lt.batched_lora_forward(T(c["x"]), T(c["W0"]), A, B, T(c["s"]), T(c["index"])).numpy()
    np.testing.assert_allclose(y, _row_loop(c), rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["auto", "gathered", "segmented", "padded", "stacked"])
@pytest.mark.parametrize("layout", ["random", "sorted", "all base", "one adapter", "unused adapter"])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_every_method_equals_the_loop_over_rows(method, layout, backend):
    """Each formulation, on indices that exercise its branches: unsorted (a permutation), sorted
    (none), only base rows, one adapter for all rows, and an adapter no row asks for."""
    c = _case(7, n=13, ranks=(2, 3, 1, 3))
    c["index"] = {"random": c["index"], "sorted": np.sort(c["index"]), "all base": np.full(13, -1),
                  "one adapter": np.full(13, 2), "unused adapter": np.array([0, 3, -1, 0, 3] * 2 + [3, 0, -1])}[layout]
    if backend == "numpy":
        A, B = ln.pad_adapters(c["As"], c["Bs"])
        y = ln.batched_lora_forward(c["x"], c["W0"], A, B, c["s"], c["index"], method=method)
    else:
        A, B = lt.pad_adapters([T(a) for a in c["As"]], [T(b) for b in c["Bs"]])
        y = lt.batched_lora_forward(T(c["x"]), T(c["W0"]), A, B, T(c["s"]), T(c["index"]), method=method).numpy()
    assert y.shape == (13, 5)
    np.testing.assert_allclose(y, _row_loop(c), rtol=0, atol=1e-12)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_an_unknown_method_is_named(backend):
    args = _good()
    with pytest.raises(ValueError, match=r"method must be one of 'auto', 'gathered', .* got method='bgmv'"):
        if backend == "numpy":
            ln.batched_lora_forward(**args, method="bgmv")
        else:
            lt.batched_lora_forward(**{key: T(v) for key, v in args.items()}, method="bgmv")


def test_the_cost_model_prefers_what_its_terms_say():
    """budget.mixed_batch_costs: segments pay two ops each, padding pays for empty rows, stacking
    pays m times the bypass, gathering a copy of the factors per row."""
    from lora_ref import budget

    d = k = 1024
    r = 16
    pick = lambda counts, **kw: budget.mixed_batch_method(counts, d, k, r, **kw)
    assert pick([512] + [0] * 15) == "segmented"                      # one adapter in use: one GEMM pair
    assert pick([32] * 16) == "segmented"                             # long segments
    assert pick([1] * 64) == "padded"                                 # 64 segments of one row: 128 ops
    assert pick([511, 1]) == "stacked"                                # m = 2: twice the bypass, no permutation
    assert pick([511, 1], in_order=True) == "segmented"               # ... unless no permutation is needed
    costs = budget.mixed_batch_costs([511, 1], d, k, r)
    assert costs["padded"] > costs["segmented"]                       # 510 rows of zeros in segment 2
    # the terms one at a time: a dearer op adds (7 + 2 u) ops to segmented, 24 to padded, 10 to the others
    op = budget.MIXED_BATCH_CONSTANTS["op"]
    c0 = budget.mixed_batch_costs([3, 4, 0], d, k, r)
    c1 = budget.mixed_batch_costs([3, 4, 0], d, k, r, constants={"op": 2 * op})
    assert {name: c1[name] - c0[name] for name in c0} == pytest.approx(
        {"segmented": 15 * op, "padded": 32 * op, "gathered": 15 * op, "stacked": 13 * op})
    # an adapter that no row uses still costs the stacked form one more block: n r (k + d) MACs, (n + d) r copies
    extra = c0["stacked"] - budget.mixed_batch_costs([3, 4], d, k, r)["stacked"]
    assert extra == pytest.approx(7 * r * (k + d) + (7 + d) * r * budget.MIXED_BATCH_CONSTANTS["copy"])
    assert c0["segmented"] == budget.mixed_batch_costs([3, 4], d, k, r)["segmented"]
    with pytest.raises(ValueError, match="counts must be"):
        budget.mixed_batch_costs([], d, k, r)
    with pytest.raises(ValueError, match="counts must be"):
        budget.mixed_batch_costs([2, -1], d, k, r)


class _CountOps(TorchDispatchMode):
    """Records every ATen operation run inside it."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


# Operations that make a view or read a scalar: no kernel over the data.
_NOT_COUNTED = {"view", "_unsafe_view", "permute", "slice", "select", "unsqueeze", "expand", "transpose",
                "lift_fresh", "_local_scalar_dense", "t", "alias", "squeeze", "as_strided", "detach"}


@pytest.mark.parametrize("m, index", [(5, [0] * 8), (1, [0] * 8), (1, [0, -1, 0]), (5, [0, 1, 2] * 4), (5, [0, 1, 2, 3] * 3),
                                      (5, sorted([0, 1, 2, 3] * 3)), (5, [0, -1, 2, 2, -1, 0, 4, 4, 4]),
                                      (5, sorted([1, 1, 2, 3, 3, 3]))])
def test_the_cost_model_counts_the_operations_the_code_launches(m, index):
    """mixed_batch_terms' "ops": the ATen operations other than views that lora_ref.torch runs for
    each method, counted with a TorchDispatchMode (independent of the hand count in its docstring)."""
    from lora_ref import budget

    d, k, r = 6, 7, 3
    g = torch.Generator().manual_seed(0)
    args = dict(x=torch.randn(len(index), k, generator=g, dtype=torch.float64),
                W0=torch.randn(d, k, generator=g, dtype=torch.float64),
                As=torch.randn(m, r, k, generator=g, dtype=torch.float64),
                Bs=torch.randn(m, d, r, generator=g, dtype=torch.float64),
                scalings=torch.ones(m, dtype=torch.float64), index=torch.tensor(index))
    counts = [index.count(j) for j in range(m)]
    terms = budget.mixed_batch_terms(counts, d, k, r, in_order=index == sorted(index))
    for method in budget.MIXED_BATCH_METHODS:
        with _CountOps() as seen:
            lt.batched_lora_forward(**args, method=method)
        launched = [op for op in seen.ops if op not in _NOT_COUNTED]
        assert len(launched) == terms[method]["ops"], (method, launched)


@pytest.mark.parametrize("seed", range(3))
def test_backends_give_the_same_numbers(seed):
    c = _case(seed, n=16, d=8, k=12, ranks=(4, 2, 4, 1))
    A, B = ln.pad_adapters(c["As"], c["Bs"])
    At, Bt = lt.pad_adapters([T(a) for a in c["As"]], [T(b) for b in c["Bs"]])
    np.testing.assert_array_equal(A, At.numpy())
    np.testing.assert_array_equal(B, Bt.numpy())
    np.testing.assert_allclose(ln.batched_lora_forward(c["x"], c["W0"], A, B, c["s"], c["index"]),
                               lt.batched_lora_forward(T(c["x"]), T(c["W0"]), At, Bt, T(c["s"]), T(c["index"])).numpy(),
                               rtol=0, atol=1e-12)


def test_padding_to_a_larger_rank_changes_no_product_and_no_output():
    c = _case(3)
    A4, B4 = ln.pad_adapters(c["As"], c["Bs"])                          # r = 3
    A9, B9 = ln.pad_adapters(c["As"], c["Bs"], r=9)
    assert A9.shape == (3, 9, 7) and B9.shape == (3, 5, 9)
    for j, (A, B) in enumerate(zip(c["As"], c["Bs"])):
        np.testing.assert_allclose(B9[j] @ A9[j], B @ A, rtol=0, atol=1e-14)
        assert not A9[j, A.shape[0]:].any() and not B9[j, :, B.shape[1]:].any()       # the padding is zeros
    y4 = ln.batched_lora_forward(c["x"], c["W0"], A4, B4, c["s"], c["index"])
    y9 = ln.batched_lora_forward(c["x"], c["W0"], A9, B9, c["s"], c["index"])
    np.testing.assert_allclose(y9, y4, rtol=0, atol=1e-13)


def test_base_rows_ignore_the_adapters_entirely():
    c = _case(0)
    A, B = ln.pad_adapters(c["As"], c["Bs"])
    index = np.full(9, -1)
    np.testing.assert_allclose(ln.batched_lora_forward(c["x"], c["W0"], A, B, c["s"], index), c["x"] @ c["W0"].T,
                               rtol=0, atol=1e-14)


def test_float32_inputs_give_float32_outputs_in_torch():
    c = _case(1)
    A, B = lt.pad_adapters([T(a).float() for a in c["As"]], [T(b).float() for b in c["Bs"]])
    y = lt.batched_lora_forward(T(c["x"]).float(), T(c["W0"]).float(), A, B, T(c["s"]).float(), T(c["index"]))
    assert y.dtype == torch.float32


# --------------------------------------------------------------------------- shape errors


def _good():
    c = _case(0)
    A, B = ln.pad_adapters(c["As"], c["Bs"])
    return dict(x=c["x"], W0=c["W0"], As=A, Bs=B, scalings=c["s"], index=c["index"])


@pytest.mark.parametrize("change, exc, match", [
    (dict(x=np.zeros(7)), ValueError, r"x must be 2-D, got shape \(7,\)"),
    (dict(W0=np.zeros((5, 6))), ValueError, r"x is \(9, 7\) = \(n, k\) but W0 is \(5, 6\) = \(d, k\)"),
    (dict(As=np.zeros((3, 3, 6))), ValueError, r"As is \(3, 3, 6\) = \(m, r, k\) but x is \(9, 7\)"),
    (dict(Bs=np.zeros((3, 5, 2))), ValueError, r"Bs is \(3, 5, 2\); .* it must be \(m, d, r\) = \(3, 5, 3\)"),
    (dict(scalings=np.ones(2)), ValueError, r"scalings has shape \(2,\); expected \(m,\) = \(3,\)"),
    (dict(index=np.zeros(8, dtype=int)), ValueError, r"index has shape \(8,\); expected \(n,\) = \(9,\)"),
    (dict(index=np.full(9, 3)), ValueError, r"index must be in \[-1, m\) = \[-1, 3\) .* from 3 to 3"),
    (dict(index=np.full(9, -2)), ValueError, r"from -2 to -2"),
    (dict(index=np.zeros(9)), TypeError, "index must hold integers"),
    (dict(index=np.zeros(9, dtype=bool)), TypeError, "index must hold integers"),
])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_bad_shapes_and_indices_are_named(backend, change, exc, match):
    args = {**_good(), **change}
    with pytest.raises(exc, match=match):
        if backend == "numpy":
            ln.batched_lora_forward(**args)
        else:
            lt.batched_lora_forward(**{key: T(v) for key, v in args.items()})


@pytest.mark.parametrize("As, Bs, r, match", [
    ([np.zeros((2, 4))], [np.zeros((3, 2)), np.zeros((3, 2))], None, "need one B per A"),
    ([], [], None, "at least one adapter"),
    ([np.zeros((2, 4)), np.zeros((2, 5))], [np.zeros((3, 2))] * 2, None, r"one \(d, k\) weight, got \(d, k\) = \[\(3, 4\), \(3, 5\)\]"),
    ([np.zeros((2, 4))], [np.zeros((3, 1))], None, r"adapter 0: .*B has 1 columns but A has 2 rows"),
    ([np.zeros((2, 4))], [np.zeros((3, 2))], 1, "r=1 is below the largest adapter rank 2"),
])
def test_pad_adapters_names_what_does_not_fit(As, Bs, r, match):
    with pytest.raises(ValueError, match=match):
        ln.pad_adapters(As, Bs, r)


# --------------------------------------------------------------------------- against PEFT, on a model


def test_three_adapters_in_one_batch_give_peft_mixed_batch_logits(make_tiny_llama, peft_adapter, tmp_path):
    """Ranks 2, 4, 8; the third adapter also adapts k_proj and o_proj, so on those layers the
    others have no adapter; rows for the base model too."""
    from peft import PeftModel

    dirs = [peft_adapter(tmp_path / "a", 2, 4, 1, ["q_proj", "v_proj"]),
            peft_adapter(tmp_path / "b", 4, 16, 2, ["q_proj", "v_proj"]),
            peft_adapter(tmp_path / "c", 8, 8, 3, ["q_proj", "k_proj", "v_proj", "o_proj"])]
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), dirs[0], adapter_name="a")
    peft_model.load_adapter(dirs[1], adapter_name="b")
    peft_model.load_adapter(dirs[2], adapter_name="c")
    peft_model.eval()
    names = ["a", "__base__", "b", "c", "a", "c", "__base__", "b"]
    index = [{"a": 0, "b": 1, "c": 2, "__base__": -1}[n] for n in names]
    ids = torch.randint(0, 64, (len(names), 6), generator=torch.Generator().manual_seed(0))
    ours = serving.multi_lora_model(make_tiny_llama(), dirs)
    with torch.no_grad():
        theirs = peft_model(input_ids=ids, adapter_names=names).logits
        with serving.adapter_index(ours, index):
            mine = ours(input_ids=ids).logits
        base = make_tiny_llama()(input_ids=ids).logits
    torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-5)
    assert all((theirs[i] - base[i]).abs().max() > 1e-2 for i, n in enumerate(names) if n != "__base__")
    torch.testing.assert_close(mine[1], base[1], rtol=0, atol=1e-6)
    assert sum(isinstance(m, serving.MultiLoRALinear) for m in ours.modules()) == 2 * 4


def test_mixed_generation_equals_each_adapter_alone(tmp_path):
    """On the shipped tiny model: greedy decoding with a KV cache, prompts of two lengths, each row
    with its adapter, gives what each adapter gives by itself."""
    from lora_ref import tiny
    from lora_ref.adapters import load_adapter, save_adapter

    base = tiny.load_tiny_llama()
    dirs = []
    for j, r in enumerate((2, 4)):
        torch.manual_seed(j)
        model = lt.add_lora(tiny.load_tiny_llama(), ["q_proj", "v_proj", "down_proj"], r=r, alpha=2 * r)
        with torch.no_grad():
            for m in lt.lora_modules(model).values():
                m.lora_B.normal_(0, 0.2)
        dirs.append(save_adapter(model, tmp_path / f"adapter{j}"))
    prompts = ["2023-04-05 -> ", "the cat ", "1999-12-31 -> ", "the dog sees ", "2001-01-01 -> ", "Alice was "]
    index = [0, 1, -1, 0, 1, 1]
    multi = serving.multi_lora_model(tiny.load_tiny_llama(), dirs)
    mixed = serving.generate_with_adapters(multi, prompts, index, max_new_tokens=12)
    alone = [tiny.generate(base if a < 0 else load_adapter(tiny.load_tiny_llama(), dirs[a]), [p], 12)[0]
             for p, a in zip(prompts, index)]
    assert mixed == alone
    assert len({tuple(tiny.generate(load_adapter(tiny.load_tiny_llama(), d), prompts[:1], 12)) for d in dirs}
               | {tuple(tiny.generate(base, prompts[:1], 12))}) > 1           # the adapters change the text


def test_model_without_an_index_or_with_a_wrong_one_says_so(make_tiny_llama, peft_adapter, tmp_path):
    d = peft_adapter(tmp_path / "a", 2, 4, 1, ["q_proj"])
    model = serving.multi_lora_model(make_tiny_llama(), [d])
    ids = torch.zeros(3, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match="no adapter index"):
        model(input_ids=ids)
    with pytest.raises(ValueError, match=r"index must be in \[-1, m\) = \[-1, 1\)"):
        with serving.adapter_index(model, [0, 1, 0]):
            model(input_ids=ids)
    with pytest.raises(ValueError, match=r"the index names 2 sequences but the input x \(3, 4, 32\) holds 3 sequences"):
        with serving.adapter_index(model, [0, 0]):
            model(input_ids=ids)
    with pytest.raises(ValueError, match="no MultiLoRALinear"):
        with serving.adapter_index(make_tiny_llama(), [0]):
            pass
    assert all(m.index is None for m in model.modules() if isinstance(m, serving.MultiLoRALinear))


# --------------------------------------------------------------------------- the benchmark, as a smoke test



@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_multi_adapter")


def test_benchmark_strategies_compute_the_same_outputs(bench):
    setup = bench.make_setup(d=32, r=4, m=4, n=8)
    bench.check_same_outputs(setup)
    assert set(setup.strategies) == set(bench.STRATEGIES)


def test_benchmark_check_catches_a_strategy_that_computes_something_else(bench):
    setup = bench.make_setup(d=32, r=4, m=4, n=8)
    strategies = dict(setup.strategies)
    strategies["per adapter"] = lambda: setup.x @ setup.W0.T                # forgets the adapters
    with pytest.raises(bench.MismatchError, match="per adapter"):
        bench.check_same_outputs(setup, strategies)


def test_benchmark_quick_run_writes_its_table(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "shapes_for", lambda quick: [(32, 4, 1, 4), (32, 4, 4, 8)])
    out = tmp_path / "bench.json"
    records = bench.main(["--quick", "--reps", "2", "--json", str(out)])
    assert len(records) == 2
    text = capsys.readouterr().out
    assert "per adapter / one" in text and "auto / one" in text and "torch " in text and "Targets" in text
    data = json.loads(out.read_text())
    assert {"header", "records"} <= set(data) and data["records"][1]["m"] == 4
    assert all(v > 0 for rec in data["records"] for v in rec["median_ms"].values())


def test_benchmark_targets_follow_their_thresholds(bench):
    def rec(auto, one, fastest=1.0):
        med = {"gathered": 9.0, "segmented": fastest, "padded": 2.0, "stacked": 3.0, "auto": auto,
               "per adapter": 4.0, "merge": 9.0, "one adapter": one, "base": 0.5}
        return {"d": 1024, "r": 16, "m": 16, "n": 512, "median_ms": med}
    assert [t["status"] for t in bench.check_targets([rec(1.1, 1.0)])] == ["PASS", "PASS"]
    assert [t["status"] for t in bench.check_targets([rec(1.6, 1.0, fastest=1.5)])] == ["MISS", "PASS"]
    assert [t["status"] for t in bench.check_targets([rec(1.3, 1.0, fastest=1.0)])] == ["PASS", "MISS"]
    assert bench.auto_choice(rec(1, 1)) == "segmented"


def test_the_fit_recovers_constants_that_made_the_timings(bench):
    """Timings synthesised from budget.mixed_batch_terms with known constants (and a base GEMM at
    1e-9 ms per MAC): fit_constants gives those constants back, and pick_quality then finds auto's
    pick the fastest on every shape."""
    from lora_ref import budget

    truth = {"macs": 0.9, "op": 3e5, "copy": 80.0, "gather": 120.0}
    unit = 1e-9                                                             # ms per MAC of the base GEMM
    records = []
    for d in (256, 1024, 4096):
        for m in (1, 4, 16, 64):
            for n in (8, 64, 512):
                counts = [len(range(j, n, m)) for j in range(m)]
                terms = budget.mixed_batch_terms(counts, d, d, 16, in_order=m == 1)
                base = unit * n * d * d
                med = {name: base + unit * (truth["macs"] * t["macs"] + truth["op"] * t["ops"] + truth["copy"] * t["copy"]
                                            + truth["gather"] * t["gather"]) for name, t in terms.items()}
                records.append({"d": d, "r": 16, "m": m, "n": n, "median_ms": {**med, "base": base}})
    fitted = bench.fit_constants(records)
    assert fitted == pytest.approx(truth, rel=1e-6)
    assert all(q == 1.0 for q, *_ in bench.pick_quality(records, fitted))   # the true costs: auto picks the fastest
    with pytest.raises(ValueError, match="at least one record"):
        bench.fit_constants([])
