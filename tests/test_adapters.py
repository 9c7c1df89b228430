"""lora_ref.adapters against PEFT: files each side writes load on the other with the same logits,
and every bad file is refused before the model is touched."""

import ast
import json
import math
import os
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora_ref import adapters
from lora_ref import torch as lt
from lora_ref.adapters import CONFIG_NAME, WEIGHTS_NAME, load_adapter, read_adapter_config, save_adapter

# transformers 5 warns about its own rename when PEFT calls it; not about adapters.
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

KEY = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"


# --------------------------------------------------------------------------- helpers


def _ids():
    return torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(123))


@torch.no_grad()
def _logits(model):
    return model(input_ids=_ids()).logits


def _randomize_B(model, seed=1):
    """Nonzero B (PEFT and lora_ref both start at B = 0), so the adapter changes the logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


def _ours(make, targets=("q_proj", "v_proj"), r=4, alpha=8, rslora=False, **overrides):
    return _randomize_B(lt.add_lora(make(**overrides), list(targets), r=r, alpha=alpha, rslora=rslora))


def _peft(make, targets=("q_proj", "v_proj"), r=4, alpha=8, rslora=False):
    targets = targets if isinstance(targets, str) else list(targets)
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, use_rslora=rslora, task_type="CAUSAL_LM")
    return _randomize_B(get_peft_model(make(), cfg))


def _snapshot(model):
    """Everything load_adapter could change: the state dict (values, names, so the module
    structure) and which parameters are trainable."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return state, {n: p.requires_grad for n, p in model.named_parameters()}


def _assert_unchanged(model, snapshot):
    state, grads = snapshot
    now = model.state_dict()
    assert list(now) == list(state)
    for k, v in state.items():
        assert torch.equal(now[k], v), k
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def _non_deprecation(records):
    """Warnings other than transformers' own deprecations (is_gradient_checkpointing, ...)."""
    return [str(w.message) for w in records if not issubclass(w.category, (DeprecationWarning, FutureWarning))]


def _edit_config(path, **changes):
    file = Path(path) / CONFIG_NAME
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def _edit_tensors(path, edit):
    file = Path(path) / WEIGHTS_NAME
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.fixture
def saved(make_tiny_llama, tmp_path):
    """A good lora_ref adapter (q_proj, v_proj, r=4, alpha=8) in tmp_path / "adapter"."""
    return save_adapter(_ours(make_tiny_llama), tmp_path / "adapter")


# --------------------------------------------------------------------------- interop with PEFT


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_ref_adapter_loads_in_peft_with_same_logits(make_tiny_llama, tmp_path, rslora):
    ours = _ours(make_tiny_llama, rslora=rslora)
    save_adapter(ours, tmp_path / "a", task_type="CAUSAL_LM")
    with warnings.catch_warnings(record=True) as records:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a")
    assert _non_deprecation(records) == []                     # no missing/unexpected keys or config fields
    cfg = peft_model.peft_config["default"]
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (4, 8, rslora)
    expected = _logits(ours)
    torch.testing.assert_close(_logits(peft_model), expected, rtol=0, atol=1e-6)
    assert (expected - _logits(make_tiny_llama())).abs().max() > 1e-2     # the adapter does something


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_loads_in_lora_ref_with_same_logits(make_tiny_llama, tmp_path, rslora):
    peft_model = _peft(make_tiny_llama, targets=("q_proj", "k_proj", "v_proj", "o_proj"), rslora=rslora)
    peft_model.save_pretrained(tmp_path / "p")
    ours = load_adapter(make_tiny_llama(), tmp_path / "p")
    layers = lt.lora_modules(ours)
    assert len(layers) == 4 * 2
    assert {(m.r, m.alpha, m.rslora) for m in layers.values()} == {(4, 8, rslora)}
    expected = _logits(peft_model)
    torch.testing.assert_close(_logits(ours), expected, rtol=0, atol=1e-6)
    assert (expected - _logits(make_tiny_llama())).abs().max() > 1e-2


@pytest.mark.parametrize("targets", [r".*\.(q|v)_proj", "all-linear"])
def test_peft_regex_and_all_linear_targets_load_in_lora_ref(make_tiny_llama, tmp_path, targets):
    """A str target_modules is PEFT's re.fullmatch on the module name ("all-linear": every
    linear layer but lm_head)."""
    peft_model = _peft(make_tiny_llama, targets=targets)
    peft_model.save_pretrained(tmp_path / "p")
    _edit_config(tmp_path / "p", target_modules=targets)     # PEFT writes "all-linear" expanded to names
    ours = load_adapter(make_tiny_llama(), tmp_path / "p")
    assert len(lt.lora_modules(ours)) == (2 if targets.startswith(".") else 7) * 2
    torch.testing.assert_close(_logits(ours), _logits(peft_model), rtol=0, atol=1e-6)


def test_saved_tensor_names_match_peft(make_tiny_llama, tmp_path):
    save_adapter(_ours(make_tiny_llama), tmp_path / "ours", task_type="CAUSAL_LM")
    _peft(make_tiny_llama).save_pretrained(tmp_path / "peft")
    ours, theirs = (load_file(tmp_path / d / WEIGHTS_NAME) for d in ("ours", "peft"))
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert KEY.format(0, "q_proj", "A") in ours                     # no adapter name ("default") in the key
    metadata = [safe_open(tmp_path / d / WEIGHTS_NAME, "pt").metadata() for d in ("ours", "peft")]
    assert metadata[0] == metadata[1] == {"format": "pt"}
    # The config: every key we write is one PEFT writes, with PEFT's value; the keys we leave
    # out take PEFT's defaults, so both files load into the same LoraConfig.
    ours_cfg, peft_cfg = (json.loads((tmp_path / d / CONFIG_NAME).read_text()) for d in ("ours", "peft"))
    assert set(ours_cfg) <= set(peft_cfg)
    for key in ours_cfg.keys() - {"target_modules"}:
        assert ours_cfg[key] == peft_cfg[key], key
    assert sorted(peft_cfg["target_modules"]) == ours_cfg["target_modules"]
    ours_loaded, peft_loaded = (LoraConfig.from_pretrained(tmp_path / d).to_dict() for d in ("ours", "peft"))
    for cfg in (ours_loaded, peft_loaded):
        cfg["target_modules"] = set(cfg["target_modules"])
    assert ours_loaded == peft_loaded


ALL_LINEAR = ["v_proj", "up_proj", "q_proj", "down_proj", "k_proj", "gate_proj", "o_proj"]

# The same seven layer names in a torch-only model (no transformers import: a fast subprocess).
_SAVE_IN_SUBPROCESS = """
import sys
from torch import nn
from lora_ref import torch as lt
from lora_ref.adapters import save_adapter
model = nn.ModuleDict({{name: nn.Linear(8, 8) for name in {targets}}})
save_adapter(lt.add_lora(model, {targets}, r=4, alpha=8), sys.argv[1])
"""


def test_target_modules_order_is_stable(make_tiny_llama, tmp_path):
    """Sorted whatever the order given and whatever PYTHONHASHSEED (a set of 7 names comes out
    sorted by chance once in 5040), and byte-identical on every save."""
    model = _ours(make_tiny_llama, targets=ALL_LINEAR)
    save_adapter(model, tmp_path / "a")
    save_adapter(model, tmp_path / "b")
    save_adapter(model, tmp_path / "c", target_modules=ALL_LINEAR[::-1])
    save_adapter(model, tmp_path / "a")                               # replacing an adapter works too
    script = _SAVE_IN_SUBPROCESS.format(targets=ALL_LINEAR[::-1])
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(Path(adapters.__file__).parents[1])}
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "d")], check=True, env=env, capture_output=True,
                   timeout=120)
    files = {d: (tmp_path / d / CONFIG_NAME).read_bytes() for d in "abcd"}
    assert files["a"] == files["b"] == files["c"] == files["d"]
    assert json.loads(files["a"])["target_modules"] == sorted(ALL_LINEAR)
    weights = {(tmp_path / d / WEIGHTS_NAME).read_bytes() for d in "abc"}
    assert len(weights) == 1
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c", "d"]      # no temporary directories left


def test_suffixes_that_select_too_much_are_saved_as_full_names(make_tiny_llama, tmp_path):
    """LoRA on layer 0's q_proj only: "q_proj" would also select layer 1's, so PEFT would add an
    (inert) layer there; the full name selects exactly one."""
    model = _randomize_B(lt.add_lora(make_tiny_llama(), ["model.layers.0.self_attn.q_proj"], r=4, alpha=8))
    save_adapter(model, tmp_path / "a")
    assert read_adapter_config(tmp_path / "a")["target_modules"] == ["model.layers.0.self_attn.q_proj"]
    peft_model = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "a")
    assert sum("lora_A" in n for n, _ in peft_model.named_parameters()) == 1
    torch.testing.assert_close(_logits(peft_model), _logits(model), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------- round trips


def test_round_trip_into_fresh_model_and_into_existing_lora_layers(make_tiny_llama, tmp_path):
    ours = _ours(make_tiny_llama, targets=("q_proj", "down_proj"), alpha=16)
    save_adapter(ours, tmp_path / "a")
    fresh = load_adapter(make_tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(_logits(fresh), _logits(ours), rtol=0, atol=0)
    existing = lt.add_lora(make_tiny_llama(), ["q_proj", "down_proj"], r=4, alpha=16)
    modules_before = dict(lt.lora_modules(existing))
    load_adapter(existing, tmp_path / "a")
    assert lt.lora_modules(existing) == modules_before                  # the same layers, new factors
    torch.testing.assert_close(_logits(existing), _logits(ours), rtol=0, atol=0)


def test_load_casts_to_parameter_dtype_and_keeps_global_rng(make_tiny_llama, saved):
    model = make_tiny_llama().double()
    rng = torch.random.get_rng_state()
    load_adapter(model, saved)
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert {m.lora_A.dtype for m in lt.lora_modules(model).values()} == {torch.float64}
    A = load_file(Path(saved) / WEIGHTS_NAME)[KEY.format(1, "v_proj", "A")]
    assert torch.equal(lt.lora_modules(model)["model.layers.1.self_attn.v_proj"].lora_A, A.double())


# --------------------------------------------------------------------------- bad input


def _refused(model, path, exc, match):
    snapshot = _snapshot(model)
    with pytest.raises(exc, match=match):
        load_adapter(model, path)
    _assert_unchanged(model, snapshot)


@pytest.mark.parametrize("with_lora", [False, True], ids=["plain", "has-lora"])
def test_tensor_with_wrong_rank_is_refused(make_tiny_llama, saved, with_lora):
    _edit_config(saved, r=8)                                           # tensors still have r = 4
    model = make_tiny_llama()
    if with_lora:
        model = lt.add_lora(model, ["q_proj", "v_proj"], r=8, alpha=8)
    _refused(model, saved, ValueError, r"q_proj\.lora_A\.weight' has shape \(4, 32\); expected \(8, 32\) = \(r, in_features\)")


def test_adapter_from_other_hidden_size_is_refused(make_tiny_llama, tmp_path):
    other = _ours(make_tiny_llama, hidden_size=16, intermediate_size=32)
    save_adapter(other, tmp_path / "a")
    _refused(make_tiny_llama(), tmp_path / "a", ValueError, r"has shape \(4, 16\); expected \(4, 32\)")


def test_missing_lora_B_is_refused(make_tiny_llama, saved):
    _edit_tensors(saved, lambda t: t.pop(KEY.format(1, "v_proj", "B")))
    _refused(make_tiny_llama(), saved, ValueError, r"missing key .*layers\.1\.self_attn\.v_proj\.lora_B\.weight")


@pytest.mark.parametrize("key, match", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight", "unexpected key"),
    ("base_model.model.lm_head.lora_A.weight", "not selected by target_modules"),
    ("base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight", "not a linear layer of the model"),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.bias", "unexpected key"),
])
def test_unexpected_key_is_refused(make_tiny_llama, saved, key, match):
    _edit_tensors(saved, lambda t: t.update({key: torch.zeros(4, 32)}))
    _refused(make_tiny_llama(), saved, ValueError, match)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_tensor_is_refused(make_tiny_llama, saved, bad):
    def poison(t):
        t[KEY.format(0, "v_proj", "B")][3, 1] = bad
    _edit_tensors(saved, poison)
    _refused(make_tiny_llama(), saved, ValueError, r"v_proj\.lora_B\.weight' has 1 non-finite")


def test_malformed_json_is_refused(make_tiny_llama, saved):
    (Path(saved) / CONFIG_NAME).write_text('{"peft_type": "LORA", "r": 4,')
    _refused(make_tiny_llama(), saved, ValueError, r"adapter_config\.json: malformed JSON")


@pytest.mark.parametrize("changes, match", [
    ({"peft_type": "IA3"}, "peft_type must be 'LORA', got 'IA3'"),
    ({"r": 0}, "r must be a positive integer, got r=0"),
    ({"r": "4"}, "r must be a positive integer"),
    ({"r": True}, "r must be a positive integer"),
    ({"r": 40}, r"r=40 exceeds min\(d, k\) = min\(32, 32\)"),
    ({"lora_alpha": math.nan}, "lora_alpha must be a finite number"),
    ({"target_modules": []}, "target_modules must be a non-empty"),
    ({"use_dora": True}, "use_dora=True is not plain LoRA"),
    ({"rank_pattern": {"q_proj": 8}}, "rank_pattern=.* is not plain LoRA"),
    ({"bias": "all"}, "bias='all' is not plain LoRA"),
    ({"layers_to_transform": 0}, "layers_to_transform=0 is not plain LoRA"),
    ({"use_rslora": "yes"}, "use_rslora must be true or false"),
])
def test_bad_config_is_refused(make_tiny_llama, saved, changes, match):
    _edit_config(saved, **changes)
    _refused(make_tiny_llama(), saved, ValueError, match)


def test_config_without_target_modules_is_refused(make_tiny_llama, saved):
    file = Path(saved) / CONFIG_NAME
    config = json.loads(file.read_text())
    del config["target_modules"]
    file.write_text(json.dumps(config))
    _refused(make_tiny_llama(), saved, ValueError, "missing key 'target_modules'")


def test_target_modules_that_select_more_than_the_file_holds_is_refused(make_tiny_llama, saved):
    _edit_config(saved, target_modules=["q_proj", "v_proj", "k_proj"])
    _refused(make_tiny_llama(), saved, ValueError, r"missing key .*layers\.0\.self_attn\.k_proj\.lora_A\.weight")


@pytest.mark.parametrize("content", [
    b"PK\x03\x04" + bytes(200),                                        # a zip (torch.save's format)
    b"\x80\x04\x95" + bytes(200),                                      # a pickle
    b"not a tensor file",
], ids=["zip", "pickle", "text"])
def test_file_that_is_not_safetensors_is_refused(make_tiny_llama, saved, content):
    (Path(saved) / WEIGHTS_NAME).write_bytes(content)
    _refused(make_tiny_llama(), saved, ValueError, r"adapter_model\.safetensors: not a readable safetensors file")


def test_truncated_safetensors_is_refused(make_tiny_llama, saved):
    file = Path(saved) / WEIGHTS_NAME
    file.write_bytes(file.read_bytes()[:-100])
    _refused(make_tiny_llama(), saved, ValueError, "not a readable safetensors file")


@pytest.mark.parametrize("missing", [CONFIG_NAME, WEIGHTS_NAME])
def test_missing_file_is_refused(make_tiny_llama, saved, missing):
    (Path(saved) / missing).unlink()
    _refused(make_tiny_llama(), saved, FileNotFoundError, missing.replace(".", r"\.") + " does not exist")


def test_missing_directory_is_refused(make_tiny_llama, tmp_path):
    _refused(make_tiny_llama(), tmp_path / "nowhere", FileNotFoundError, "does not exist")


@pytest.mark.parametrize("existing, match", [
    (dict(targets=["q_proj"], r=4, alpha=8), r"already has LoRA layers"),
    (dict(targets=["q_proj", "v_proj"], r=4, alpha=16), r"has \(r, alpha, rslora\)=\(4, 16, False\)"),
])
def test_mismatched_existing_lora_layers_are_refused(make_tiny_llama, saved, existing, match):
    model = lt.add_lora(make_tiny_llama(), existing["targets"], r=existing["r"], alpha=existing["alpha"])
    _refused(model, saved, ValueError, match)


def test_merged_lora_layers_are_refused(make_tiny_llama, saved):
    model = lt.add_lora(make_tiny_llama(), ["q_proj", "v_proj"], r=4, alpha=8)
    next(iter(lt.lora_modules(model).values())).merge()
    _refused(model, saved, ValueError, "is merged")


# --------------------------------------------------------------------------- saving


def test_layers_with_different_hyperparameters_are_not_saved(make_tiny_llama, tmp_path):
    model = lt.add_lora(make_tiny_llama(), ["q_proj"], r=4, alpha=8)
    lt.add_lora(model, ["v_proj"], r=2, alpha=8)
    with pytest.raises(ValueError, match=r"\(4, 8, False, 0\.0\): \['model.layers.0.self_attn.q_proj'.*"
                                         r"\(2, 8, False, 0\.0\): \['model.layers.0.self_attn.v_proj'"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_model_without_lora_or_with_wrong_targets_is_not_saved(make_tiny_llama, tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(make_tiny_llama(), tmp_path / "a")
    with pytest.raises(ValueError, match=r"also selects \[.*k_proj.*\] and misses \[\]"):
        save_adapter(_ours(make_tiny_llama), tmp_path / "a", target_modules=["q_proj", "v_proj", "k_proj"])
    assert os.listdir(tmp_path) == []


def test_failed_save_leaves_no_half_written_adapter(make_tiny_llama, tmp_path, monkeypatch):
    first = _ours(make_tiny_llama)
    save_adapter(first, tmp_path / "a")
    before = {f: (tmp_path / "a" / f).read_bytes() for f in (CONFIG_NAME, WEIGHTS_NAME)}

    def fail(tensors, file, metadata=None):
        Path(file).write_bytes(b"half")                               # a partial write, then a crash
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", fail)
    second = _ours(make_tiny_llama, alpha=16)
    for target in ("a", "b"):                                         # replacing one, creating one
        with pytest.raises(OSError, match="disk full"):
            save_adapter(second, tmp_path / target)
    assert sorted(os.listdir(tmp_path)) == ["a"]                      # no "b", no temporary directory
    assert {f: (tmp_path / "a" / f).read_bytes() for f in (CONFIG_NAME, WEIGHTS_NAME)} == before


def test_directory_with_other_files_is_not_replaced(make_tiny_llama, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"holds files other than an adapter: \['notes.txt'\]"):
        save_adapter(_ours(make_tiny_llama), tmp_path / "a")
    assert os.listdir(tmp_path / "a") == ["notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["a"]


# --------------------------------------------------------------------------- no pickle


def test_files_are_not_pickle_and_adapters_never_unpickles(saved):
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        head = (Path(saved) / name).read_bytes()[:4]
        assert not head.startswith(b"\x80") and not head.startswith(b"PK"), name   # pickle / zip magic
    header_len = int.from_bytes((Path(saved) / WEIGHTS_NAME).read_bytes()[:8], "little")
    assert (Path(saved) / WEIGHTS_NAME).read_bytes()[8:9] == b"{" and header_len > 0   # safetensors: u64 + JSON
    tree = ast.parse(Path(adapters.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & {"pickle", "cPickle", "dill", "joblib", "marshal", "shelve"}
    calls = {(n.value.id, n.attr) for n in ast.walk(tree)
             if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)}
    assert not calls & {("torch", "load"), ("torch", "save"), ("pickle", "load"), ("pickle", "loads")}


def test_saved_adapter_directory_has_the_usual_mode_not_mkdtemps_private_one(saved):
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(os.stat(saved).st_mode) == 0o777 & ~umask
