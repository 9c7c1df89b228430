"""Shared fixtures. Models are built from configs in code and seeded: nothing is downloaded."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

# The independent oracles the tests compare lora_ref against. Locally a test that needs a missing
# one skips (pytest.importorskip); under CI=true the whole run stops instead, so a CI without PEFT
# or bitsandbytes cannot pass by skipping their conformance tests.
ORACLES = ("peft", "bitsandbytes", "transformers", "safetensors", "torch")


def pytest_configure(config):
    import lora_ref

    lora_ref.quiet()            # no transformers / bitsandbytes logs or progress bars in the test output
    if os.environ.get("CI", "").lower() in ("true", "1"):
        missing = [name for name in ORACLES if importlib.util.find_spec(name) is None]
        if missing:
            raise pytest.UsageError(f"CI=true, but the test oracles {missing} are not installed: "
                                    "install requirements.txt (make setup) rather than skip their tests")


@pytest.fixture(scope="session")
def load_benchmark():
    """A loader: load_benchmark("bench_nf4") imports benchmarks/bench_nf4.py as a module, for the
    benchmarks' smoke tests. It is registered in sys.modules while the tests run (dataclasses
    look their module up there) and removed at the end of the session."""
    loaded = []
    if str(BENCHMARKS) not in sys.path:                 # the benchmarks import their shared _cli
        sys.path.insert(0, str(BENCHMARKS))

    def load(name):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        loaded.append(name)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


TINY_LLAMA = dict(
    vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)


@pytest.fixture
def make_tiny_llama():
    """A factory: make_tiny_llama(seed=0, **overrides) -> a fresh LlamaForCausalLM in eval mode.

    The same seed gives the same weights, so two calls give two independent copies of
    one base model. Sizes: hidden 32, 2 layers, 4 query heads of 8, 2 KV heads (k/v_proj
    are 32 -> 16), MLP 32 -> 64 -> 32, vocabulary 64.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    def make(seed=0, **overrides):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA, **overrides})).eval()

    return make


@pytest.fixture
def tiny_llama(make_tiny_llama):
    """One tiny LlamaForCausalLM (seed 0), in eval mode."""
    return make_tiny_llama()


@pytest.fixture(scope="session")
def shipped_tiny():
    """The shipped tiny model (``lora_ref.tiny.load_tiny_llama()``), loaded once per session.
    Shared: a test must not modify it (``tiny.fine_tune`` and ``standard_fine_tune`` train copies)."""
    from lora_ref import tiny

    return tiny.load_tiny_llama()


@pytest.fixture
def peft_adapter(make_tiny_llama):
    """A factory: peft_adapter(path, r, alpha, seed, targets=("q_proj", "v_proj"), rslora=False,
    **model_overrides) saves a PEFT adapter on ``make_tiny_llama(**model_overrides)`` with every
    LoRA factor drawn at random (N(0, 0.3^2), seeded, so B != 0 and the adapter acts) and returns
    its folder."""
    import torch
    from peft import LoraConfig, get_peft_model

    def save(path, r, alpha, seed, targets=("q_proj", "v_proj"), rslora=False, **overrides):
        config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora)
        model = get_peft_model(make_tiny_llama(**overrides), config)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.save_pretrained(path)
        return Path(path)

    return save
