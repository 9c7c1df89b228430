"""Smoke test of benchmarks/bench_lora_linear.py on one tiny shape.

No timing assertions: the machine is shared and noisy. What is checked is the
structure of the results and that the benchmark's equality check really catches a
variant that computes something else (then the timings would compare unequal work).
"""

import json
import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from lora_ref.torch import LoRALinear  # noqa: E402

pytestmark = pytest.mark.slow          # make unit leaves it out; make test runs it

D, R, T = 64, 4, 8
FAST = dict(target_rep_s=0.002)   # ~2 ms per repetition: a smoke run, not a measurement


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_lora_linear")


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(min(2, before))
    yield
    torch.set_num_threads(before)


def test_setup_shares_base_and_factors(bench):
    s = bench.make_setup(D, R, T)
    assert set(s.variants) == set(bench.VARIANTS)
    assert s.x.shape == (T, D) and s.x.requires_grad and s.grad.shape == (T, D)
    assert bool(s.B.abs().min() > 0), "B must be nonzero so the bypass counts"
    ours, theirs = s.variants["lora_ref"].module, s.variants["peft"].module
    assert ours.base_layer is s.base and theirs.base_layer is s.base
    assert type(theirs).__module__.startswith("peft.tuners.lora")
    for v in s.variants.values():
        if v.has_adapter:
            assert torch.equal(v.A.detach(), s.A) and torch.equal(v.B.detach(), s.B)
            assert v.A.requires_grad and v.B.requires_grad
    assert not s.base.weight.requires_grad
    bench.check_same_outputs(s)                      # the four variants agree


def test_bench_shape_result_structure(bench):
    rec = bench.bench_shape(D, R, T, reps=2, **FAST)
    assert (rec["d"], rec["k"], rec["r"], rec["T"], rec["reps"]) == (D, D, R, T, 2)
    assert rec["scaling"] == pytest.approx(bench.ALPHA / R)
    for key in ("median_ms", "samples_ms", "number"):
        assert set(rec[key]) == set(bench.VARIANTS)
        for name in bench.VARIANTS:
            assert set(rec[key][name]) == set(bench.MODES)
    for name in bench.VARIANTS:
        for mode in bench.MODES:
            samples = rec["samples_ms"][name][mode]
            assert len(samples) == 2 and all(math.isfinite(t) and t > 0 for t in samples)
            assert rec["median_ms"][name][mode] == pytest.approx(sorted(samples)[0] / 2 + sorted(samples)[1] / 2)
            assert isinstance(rec["number"][name][mode], int) and rec["number"][name][mode] >= 1
    for paired in (False, True):
        q = bench.ratios(rec, paired=paired)
        assert set(q) == {"ref/peft_fb", "ref/peft_fwd", "ref/base_fwd", "naive/ref_fb"}
        assert all(math.isfinite(v) and v > 0 for v in q.values())
    assert math.isfinite(bench.spread(rec)) and bench.spread(rec) >= 0
    assert str(R) in bench.format_row(rec)
    json.dumps(rec)                                  # --json must be able to write it

    targets = bench.check_targets([rec])
    assert [t["status"] for t in targets][1:] == ["SKIP", "SKIP"]   # no T=4096, no d=4096 here
    assert targets[0]["status"] in ("PASS", "MISS") and targets[0]["lines"]


def test_check_targets_logic(bench):
    """Fake medians: the PASS/MISS verdicts follow the stated thresholds."""
    def rec(d, r, T, ref_fwd, ref_fb, peft_fwd, peft_fb, base_fwd, naive_fb):
        m = {"lora_ref": {"fwd": ref_fwd, "fb": ref_fb}, "peft": {"fwd": peft_fwd, "fb": peft_fb},
             "base": {"fwd": base_fwd, "fb": 1.0}, "naive": {"fwd": 1.0, "fb": naive_fb}}
        return {"d": d, "k": d, "r": r, "T": T, "median_ms": m}

    good = [rec(4096, 8, 4096, 1.05, 2.0, 1.1, 2.1, 1.0, 3.0), rec(4096, 8, 1, 1.0, 1.0, 1.0, 1.2, 0.5, 5.0)]
    assert [t["status"] for t in bench.check_targets(good)] == ["PASS", "PASS", "PASS"]
    bad = [rec(4096, 8, 4096, 1.2, 2.2, 1.1, 2.0, 1.0, 2.5)]      # slower than PEFT, 1.2x base, naive 1.14x
    assert [t["status"] for t in bench.check_targets(bad)] == ["MISS", "MISS", "MISS"]


def _with_variant(bench, setup, name, module, A=None, B=None, has_adapter=True):
    variants = dict(setup.variants)
    variants[name] = bench.Variant(name, module, A, B, has_adapter)
    return variants


def test_equality_check_catches_wrong_scaling(bench):
    s = bench.make_setup(D, R, T)
    wrong = bench.NaiveLoRALinear(s.base, s.A, s.B, 2 * s.scaling)
    with pytest.raises(bench.MismatchError, match="naive"):
        bench.check_same_outputs(s, _with_variant(bench, s, "naive", wrong, wrong.lora_A, wrong.lora_B))

    ours = LoRALinear(s.base, R, 2 * bench.ALPHA)                # alpha doubled: s doubled
    with torch.no_grad():
        ours.lora_A.copy_(s.A)
        ours.lora_B.copy_(s.B)
    with pytest.raises(bench.MismatchError, match="lora_ref"):
        bench.check_same_outputs(s, _with_variant(bench, s, "lora_ref", ours, ours.lora_A, ours.lora_B))


def test_equality_check_catches_base_posing_as_adapter(bench):
    s = bench.make_setup(D, R, T)
    with pytest.raises(bench.MismatchError, match="on y"):
        bench.check_same_outputs(s, _with_variant(bench, s, "base", s.base, has_adapter=True))


def test_equality_check_catches_wrong_gradient(bench):
    """Right output, wrong backward: B is detached, so dL/dB never arrives."""

    class DetachedB(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            m = self.inner
            return m.base_layer(x) + m.scaling * ((x @ m.lora_A.T) @ m.lora_B.detach().T)

    s = bench.make_setup(D, R, T)
    inner = s.variants["lora_ref"].module
    variants = _with_variant(bench, s, "detached", DetachedB(inner), inner.lora_A, inner.lora_B)
    with pytest.raises(bench.MismatchError, match="B.grad"):
        bench.check_same_outputs(s, variants)


def test_main_cli_on_tiny_shape(bench, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(bench, "shapes_for", lambda quick: [(D, R, T)])
    monkeypatch.setattr(bench, "TARGET_REP_S", 0.002)
    out = tmp_path / "bench.json"
    records, targets = bench.main(["--quick", "--reps", "1", "--json", str(out)])
    assert len(records) == 1 and records[0]["reps"] == 1 and len(targets) == 3
    text = capsys.readouterr().out
    assert "torch " in text and "CPU:" in text and "Targets" in text
    data = json.loads(out.read_text())
    assert set(data) >= {"header", "wall_s", "records", "ratios", "paired_ratios", "targets"}
    assert data["records"][0]["d"] == D


def test_crossover_times_both_forms_and_restores_the_constant(bench):
    before = bench.lt.MATERIALISE_AT
    rec = bench.bench_crossover(D, R, 3, reps=2, target_rep_s=0.002)
    assert bench.lt.MATERIALISE_AT == before                  # the forced forms put it back
    assert rec["n"] == int(3 * D / 2) and rec["reps"] == 2
    assert set(rec["median_ms"]) == {"bypass", "materialised", "base"}
    assert all(math.isfinite(rec[key]) and rec[key] > 0
               for key in ("bypass/base", "materialised/base", "paired bypass/materialised"))
    assert "materialised" in bench.format_crossover_row(rec)  # 3 T* > MATERIALISE_AT T*
    json.dumps(rec)


def test_crossover_verdicts_follow_the_constant(bench):
    at = bench.lt.MATERIALISE_AT
    rec = lambda factor, q: {"d": 64, "r": 4, "factor": factor, "paired bypass/materialised": q}
    good = [rec(at / 2, 0.9), rec(at, 1.04), rec(1.5 * at, 0.96), rec(3 * at, 1.2)]
    assert bench.check_crossover(good)[0]["status"] == "PASS"
    assert bench.check_crossover([rec(at, 1.2)])[0]["status"] == "MISS"          # the bypass kept too long
    assert bench.check_crossover([rec(2 * at, 0.8)])[0]["status"] == "MISS"      # materialised too early
    assert bench.check_crossover([rec(1.2 * at, 0.5)])[0]["status"] == "SKIP"    # between: no verdict


def test_the_forward_target_moves_with_the_flop_floor_of_each_rank(bench):
    """LoRALinear fwd / base = 1.15 at d = 1024, T = 4096: a MISS at r = 8 (floor 1 + 16/1024, + 0.05),
    a PASS at r = 64 (floor 1 + 128/1024, + 0.06)."""
    def rec(r, ref_fwd):
        m = {"lora_ref": {"fwd": ref_fwd, "fb": 1.0}, "peft": {"fwd": 2.0, "fb": 1.0},
             "base": {"fwd": 1.0, "fb": 1.0}, "naive": {"fwd": 1.0, "fb": 2.0}}
        return {"d": 1024, "k": 1024, "r": r, "T": 4096, "median_ms": m}
    assert bench.check_targets([rec(8, 1.15)])[1]["status"] == "MISS"
    assert bench.check_targets([rec(64, 1.15)])[1]["status"] == "PASS"
    assert bench.check_targets([rec(8, 1.06)])[1]["status"] == "PASS"
