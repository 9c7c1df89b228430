"""The two backends are one API: same names, same signatures, same numbers."""

import inspect
import subprocess
import sys

import numpy as np
import pytest
import torch

from lora_ref import numpy as ln
from lora_ref import torch as lt

SHARED = ln.__all__


def test_numpy_backend_exports_the_documented_api():
    assert SHARED == ["scaling", "kaiming_a_bound", "gaussian_a_std", "init_lora", "lora_forward", "delta_w",
                      "merge", "unmerge", "lora_grads", "delta_w_sgd_step", "pad_adapters", "batched_lora_forward",
                      "pissa_init", "milora_init", "olora_init", "pissa_to_lora", "dora_magnitude", "dora_forward",
                      "dora_grads", "vera_forward", "loraga_init"]
    for name in SHARED:
        assert callable(getattr(ln, name))


def test_torch_backend_has_every_numpy_name():
    missing = [n for n in SHARED if n not in lt.__all__ or not hasattr(lt, n)]
    assert not missing, f"lora_ref.torch lacks {missing}"


@pytest.mark.parametrize("name", SHARED)
def test_signatures_are_identical(name):
    sig_np = inspect.signature(getattr(ln, name))
    sig_t = inspect.signature(getattr(lt, name))
    as_tuples = lambda s: [(p.name, p.kind, p.default) for p in s.parameters.values()]
    assert as_tuples(sig_np) == as_tuples(sig_t), f"{name}: {sig_np} != {sig_t}"


# init_lora is the one deliberate difference: with seed=None the torch backend draws from torch's
# global generator (as PEFT does), which NumPy has no counterpart for.
MIRRORED = [n for n in SHARED if n != "init_lora"]


@pytest.mark.parametrize("name", MIRRORED)
def test_mirrored_functions_have_the_same_source_so_they_cannot_drift(name):
    """One formula, written once: the two backends' bodies are the same text, docstring included."""
    assert inspect.getsource(getattr(ln, name)) == inspect.getsource(getattr(lt, name))


NUMPY_ONLY = ["numpy", "spectral", "budget", "targets", "rank_scaling", "initialization", "gradient_dynamics",
              "low_rank", "adapter_geometry", "variants", "hyperparams", "parallelism"]


def test_importing_numpy_backend_does_not_import_torch():
    """The modules the README calls NumPy only import neither torch nor anything that does."""
    code = f"import sys, lora_ref, {', '.join('lora_ref.' + m for m in NUMPY_ONLY)}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "False"


def _inputs(seed, n=7, d=6, k=9, r=3):
    rng = np.random.default_rng(seed)
    return dict(
        x=rng.normal(size=(n, k)),
        W0=rng.normal(size=(d, k)),
        A=rng.normal(size=(r, k)),
        B=rng.normal(size=(d, r)),
        g=rng.normal(size=(n, d)),
    )


T = lambda a: torch.from_numpy(np.asarray(a))
TOL = dict(rtol=0, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_same_numbers_in_float64(seed):
    v = _inputs(seed)
    s = ln.scaling(16, 3)
    assert s == lt.scaling(16, 3) and ln.scaling(16, 3, rslora=True) == lt.scaling(16, 3, rslora=True)
    np.testing.assert_allclose(
        ln.lora_forward(v["x"], v["W0"], v["A"], v["B"], s),
        lt.lora_forward(T(v["x"]), T(v["W0"]), T(v["A"]), T(v["B"]), s).numpy(),
        **TOL,
    )
    np.testing.assert_allclose(ln.delta_w(v["A"], v["B"], s), lt.delta_w(T(v["A"]), T(v["B"]), s).numpy(), **TOL)
    np.testing.assert_allclose(
        ln.merge(v["W0"], v["A"], v["B"], s), lt.merge(T(v["W0"]), T(v["A"]), T(v["B"]), s).numpy(), **TOL
    )
    np.testing.assert_allclose(
        ln.unmerge(v["W0"], v["A"], v["B"], s), lt.unmerge(T(v["W0"]), T(v["A"]), T(v["B"]), s).numpy(), **TOL
    )
    for a, b in zip(
        ln.lora_grads(v["x"], v["g"], v["A"], v["B"], s),
        lt.lora_grads(T(v["x"]), T(v["g"]), T(v["A"]), T(v["B"]), s),
    ):
        np.testing.assert_allclose(a, b.numpy(), **TOL)


@pytest.mark.parametrize("kwargs", [{}, {"init": "gaussian"}, {"init": "gaussian", "a_std": 0.3, "b_std": 0.7}, {"b_std": 2.0}])
def test_init_lora_gives_same_numbers_for_same_seed(kwargs):
    A, B = ln.init_lora(12, 20, 4, seed=123, **kwargs)
    At, Bt = lt.init_lora(12, 20, 4, seed=123, **kwargs)
    assert At.dtype == torch.float64 and A.dtype == np.float64
    np.testing.assert_array_equal(A, At.numpy())
    np.testing.assert_array_equal(B, Bt.numpy())
    A2, _ = ln.init_lora(12, 20, 4, seed=124, **kwargs)
    assert not np.array_equal(A, A2), "a different seed must give different numbers"


def test_init_lora_dtype_argument_is_respected_by_both():
    A, B = ln.init_lora(4, 5, 2, dtype="float32")
    At, Bt = lt.init_lora(4, 5, 2, dtype="float32")
    assert A.dtype == np.float32 and At.dtype == torch.float32
    np.testing.assert_array_equal(A, At.numpy())
