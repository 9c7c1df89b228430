"""Parameter counts and memory budgets from model configs (lora_ref.budget).

The oracles are transformers (the real model, built on the meta device from the shipped
config: no weights are allocated and nothing is downloaded) and PEFT (which counts the
trainable parameters of the wrapped model).
"""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_ref import budget

LLAMA_8B = "llama-3.1-8b"
SHIPPED = ["llama-2-7b", "llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2-72b", "qwen2.5-0.5b"]


@pytest.fixture(scope="module")
def llama8b():
    return budget.load_config(LLAMA_8B)


# ----------------------------------------------------------------------------- configs

def test_shipped_configs_are_the_six_models_with_their_hub_source():
    assert budget.available_configs() == sorted(SHIPPED)
    sources = {name: budget.load_config(name)["_source"] for name in SHIPPED}
    assert sources == {
        "llama-2-7b": "meta-llama/Llama-2-7b-hf",
        "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
        "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
        "mistral-7b": "mistralai/Mistral-7B-v0.1",
        "qwen2-72b": "Qwen/Qwen2-72B",
        "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    }


def test_qwen2_5_0_5b_has_its_published_494m_parameters():
    assert budget.base_param_count(budget.load_config("qwen2.5-0.5b")) == 494_032_768


def test_llama_3_1_8b_config_has_the_published_shapes(llama8b):
    expected = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                    tie_word_embeddings=False, rope_theta=500000.0,
                    max_position_embeddings=131072, rms_norm_eps=1e-05)
    assert {k: llama8b[k] for k in expected} == expected


def test_llama_2_7b_config_has_the_published_shapes_and_no_gqa():
    cfg = budget.load_config("llama-2-7b")
    expected = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                    tie_word_embeddings=False)
    assert {k: cfg[k] for k in expected} == expected
    assert budget.linear_shapes(cfg)["v_proj"] == (4096, 4096)
    assert budget.base_param_count(cfg) == 6_738_415_616


def test_unknown_config_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"'llama-9b'.*llama-3\.1-8b"):
        budget.load_config("llama-9b")


# ----------------------------------------------------------------------------- shapes

def test_gqa_makes_k_and_v_proj_4096_to_1024_in_llama_3_1_8b(llama8b):
    # W0 is (d, k) = (out, in), as everywhere in the book
    assert budget.linear_shapes(llama8b) == {
        "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096),
        "o_proj": (4096, 4096), "gate_proj": (14336, 4096), "up_proj": (14336, 4096),
        "down_proj": (4096, 14336),
    }
    assert budget.linear_shapes(llama8b)["k_proj"].d == 1024


def test_head_dim_defaults_to_hidden_over_heads_and_kv_heads_to_heads():
    cfg = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8)
    assert budget.linear_shapes(cfg)["k_proj"] == (64, 64)                     # no GQA
    assert budget.linear_shapes({**cfg, "head_dim": 16})["q_proj"] == (128, 64)  # explicit head_dim


def test_named_target_sets_resolve_to_module_names():
    assert budget.resolve_targets("qv") == ("q_proj", "v_proj")
    assert budget.resolve_targets("attention") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert budget.resolve_targets("all-linear") == budget.LINEAR_MODULES
    assert budget.resolve_targets(["v_proj", "q_proj", "v_proj"]) == ("q_proj", "v_proj")


def test_targets_follow_peft_rule_regexes_suffixes_and_bare_strings():
    assert budget.resolve_targets(r".*\.(q|v)_proj") == ("q_proj", "v_proj")
    assert budget.resolve_targets(["mlp.down_proj", "self_attn.o_proj"]) == ("o_proj", "down_proj")
    with pytest.raises(ValueError, match=r"regex.*\['q_proj'\]"):
        budget.resolve_targets("q_proj")                    # PEFT: a string is a regex full match


# ----------------------------------------------------------------------------- LoRA counts

@pytest.mark.parametrize("targets, r, expected", [
    ("qv", 16, 6_815_744),
    (["q_proj", "v_proj"], 16, 6_815_744),
    ("attention", 16, 13_631_488),
    ("all-linear", 16, 41_943_040),
    ("all-linear", 64, 167_772_160),
])
def test_lora_count_of_llama_3_1_8b_matches_the_table(llama8b, targets, r, expected):
    assert budget.lora_param_count(llama8b, r, targets) == expected


def test_llama_3_1_8b_has_8_030_261_248_base_parameters(llama8b):
    assert budget.base_param_count(llama8b) == 8_030_261_248


def test_base_breakdown_sums_to_base_count_and_untied_lm_head_counts_once_more(llama8b):
    parts = budget.base_param_breakdown(llama8b)
    assert sum(parts.values()) == budget.base_param_count(llama8b)
    tied = {**llama8b, "tie_word_embeddings": True}
    assert budget.base_param_count(llama8b) - budget.base_param_count(tied) == 128256 * 4096


def test_adapter_bytes_default_is_fp32_as_peft_saves(llama8b):
    assert budget.adapter_bytes(llama8b, 16, "all-linear") == 4 * 41_943_040
    assert budget.adapter_bytes(llama8b, 16, "all-linear", bytes_per_param=2) == 2 * 41_943_040
    with pytest.raises(ValueError, match="bytes_per_param=0"):
        budget.adapter_bytes(llama8b, 16, "qv", bytes_per_param=0)


def _safetensors_layout(path):
    """(header bytes: 8-byte length + JSON, tensor payload bytes, {name: dtype}) of a .safetensors file."""
    import json
    import struct

    raw = path.read_bytes()
    (n_header,) = struct.unpack("<Q", raw[:8])                 # little-endian u64 length of the JSON
    header = json.loads(raw[8:8 + n_header])
    dtypes = {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return 8 + n_header, len(raw) - 8 - n_header, dtypes


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("autocast, dtype, nbytes", [(True, "F32", 4), (False, "BF16", 2)])
def test_peft_saves_a_bf16_models_adapter_at_4_bytes_per_param_by_default(
        make_tiny_llama, tmp_path, autocast, dtype, nbytes):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    base = make_tiny_llama().to(torch.bfloat16)              # a bf16 base, as models are shipped
    cfg = base.config.to_dict()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                                autocast_adapter_dtype=autocast)
    model.save_pretrained(tmp_path)
    header, payload, dtypes = _safetensors_layout(tmp_path / "adapter_model.safetensors")
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == budget.lora_param_count(cfg, 4, "qv") == 896
    assert set(dtypes.values()) == {dtype} and len(dtypes) == 2 * 2 * 2   # A, B x q, v x 2 layers
    assert payload == nbytes * trainable
    if autocast:                                              # PEFT's default
        assert payload == budget.adapter_bytes(cfg, 4, "qv")
    else:
        assert payload == budget.adapter_bytes(cfg, 4, "qv", bytes_per_param=2)
    # the header: 8 + 1,016 bytes for these 8 tensors with PEFT 0.21.2, i.e. about 130 per tensor
    assert 100 * len(dtypes) < header < 160 * len(dtypes)


_small_config = st.builds(
    lambda h, i, heads, group, head_dim, layers: dict(
        hidden_size=h, intermediate_size=i, num_attention_heads=heads * group,
        num_key_value_heads=heads, head_dim=head_dim, num_hidden_layers=layers, vocab_size=100),
    st.integers(8, 512), st.integers(8, 2048), st.integers(1, 8), st.integers(1, 4),
    st.integers(8, 64), st.integers(1, 4),
)


@settings(max_examples=50, deadline=None)
@given(cfg=_small_config, r=st.integers(1, 8))
def test_lora_count_is_linear_in_r_and_additive_over_modules(cfg, r):
    total = budget.lora_param_count(cfg, r, "all-linear")
    assert total == r * budget.lora_param_count(cfg, 1, "all-linear")
    assert total == sum(budget.lora_param_count(cfg, r, [m]) for m in budget.LINEAR_MODULES)


# ----------------------------------------------------------------------------- the published wrong figures

def _millions(n):
    return f"{n / 1e6:.1f}M"


def test_correct_counts_are_not_the_published_wrong_figures(llama8b):
    ours = {_millions(budget.lora_param_count(llama8b, r, t))
            for t, r in [("qv", 16), ("attention", 16), ("all-linear", 16), ("all-linear", 64)]}
    assert ours == {"6.8M", "13.6M", "41.9M", "167.8M"}
    assert ours.isdisjoint({"4.2M", "8.4M", "24.6M", "98.3M"})


def test_published_4_2M_and_8_4M_are_right_for_llama_2_7b_on_qv_at_r8_and_r16():
    found = {f: {(m.config, m.targets, m.r, m.count) for m in budget.search_lora_counts(f)}
             for f in (4.2, 8.4)}
    assert found == {
        4.2: {("llama-2-7b", "qv", 8, 4_194_304), ("llama-2-7b", "attention", 4, 4_194_304)},
        8.4: {("llama-2-7b", "qv", 16, 8_388_608), ("llama-2-7b", "attention", 8, 8_388_608)},
    }


def test_single_modules_of_llama_3_1_8b_at_r16_give_4_2M():
    singles = [[m] for m in budget.LINEAR_MODULES]
    found = {(m.targets, m.r) for m in budget.search_lora_counts(4.2, configs=[LLAMA_8B], target_sets=singles)}
    assert found == {(("q_proj",), 16), (("o_proj",), 16)}


@pytest.mark.parametrize("figure", [24.6, 98.3])
def test_no_shipped_configuration_gives_24_6M_or_98_3M_even_over_all_module_subsets(figure):
    assert len(budget.module_subsets()) == 2**7 - 1
    assert budget.search_lora_counts(figure, target_sets=budget.module_subsets()) == []


def test_search_rounds_half_up_in_millions(llama8b):
    # 6,815,744 (Llama-3.1-8B, q, v, r = 16) is 6.8M at one decimal and 6.82M at two
    assert (LLAMA_8B, "qv", 16, 6_815_744) in budget.search_lora_counts(6.8)
    assert (LLAMA_8B, "qv", 16, 6_815_744) in budget.search_lora_counts(6.82, decimals=2)
    assert (LLAMA_8B, "qv", 16, 6_815_744) not in budget.search_lora_counts(6.9)
    # r above min(d, k) of a target is skipped, never an error
    assert budget.search_lora_counts(1e6, ranks=(2**20,)) == []


def test_search_bad_input_is_named():
    with pytest.raises(ValueError, match="decimals=7"):
        budget.search_lora_counts(8.4, decimals=7)
    with pytest.raises(ValueError, match="'llama-9b'"):
        budget.search_lora_counts(8.4, configs=["llama-9b"])


def test_full_finetune_of_8b_is_128_GB_not_72(llama8b):
    assert f"{budget.full_finetune_memory(llama8b).gb:.0f}" == "128"


def test_optimizer_schemes_span_6_to_16_bytes_per_param_and_sum_their_parts(llama8b):
    per_param = {s: budget.bytes_per_param(s) for s in budget.OPTIMIZER_SCHEMES}
    assert per_param == {
        "fp32 Adam": 16, "mixed-precision Adam": 16, "bf16 weights, fp32 Adam, no master": 12,
        "mixed-precision 8-bit Adam": 2 + 2 + 4 + 2 + 8 / 256, "pure bf16 Adam": 8,
        "bf16 weights, 8-bit Adam, no master": 2 + 2 + 2 + 8 / 256,
    }
    n = budget.base_param_count(llama8b)
    for s, b in per_param.items():
        est = budget.full_finetune_memory(llama8b, s)
        assert est.total_bytes == b * n
    assert budget.full_finetune_memory(llama8b).breakdown == budget.full_finetune_memory(
        llama8b, "mixed-precision Adam").breakdown
    with pytest.raises(ValueError, match="scheme='adam'.*'mixed-precision Adam'"):
        budget.full_finetune_memory(llama8b, "adam")


def test_72_GB_for_llama_3_1_8b_is_nearest_pure_bf16_adam(llama8b):
    per_param = 72e9 / budget.base_param_count(llama8b)
    assert round(per_param, 2) == 8.97
    nearest = min(budget.OPTIMIZER_SCHEMES, key=lambda s: abs(budget.bytes_per_param(s) - per_param))
    assert nearest == "pure bf16 Adam"


def _state_bytes(opt, p):
    """Bytes of the per-parameter state tensors that optimizer `opt` holds for p (not shared maps)."""
    import torch
    return sum(v.numel() * v.element_size() for k, v in opt.state[p].items()
               if torch.is_tensor(v) and k not in ("step", "qmap1", "qmap2"))


def test_adam_state_bytes_match_the_schemes_for_torch_and_bitsandbytes():
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    n = 8192                                                 # >= bitsandbytes' min_8bit_size 4096
    schemes = budget.OPTIMIZER_SCHEMES
    for dtype, scheme, parts in [
        (torch.float32, "fp32 Adam", ("Adam m (fp32)", "Adam v (fp32)")),
        (torch.bfloat16, "pure bf16 Adam", ("Adam m (bf16)", "Adam v (bf16)")),
    ]:
        p = torch.nn.Parameter(torch.randn(n, dtype=dtype))
        opt = torch.optim.Adam([p])
        p.grad = torch.randn_like(p)
        opt.step()
        assert _state_bytes(opt, p) == n * sum(schemes[scheme][k] for k in parts)
    p = torch.nn.Parameter(torch.randn(n, dtype=torch.bfloat16))
    opt = bnb.optim.Adam8bit([p])
    p.grad = torch.randn_like(p)
    opt.step()
    parts = ("Adam m, v (8-bit codes)", "8-bit state absmax (fp32 per 256)")
    for scheme in ("mixed-precision 8-bit Adam", "bf16 weights, 8-bit Adam, no master"):
        assert _state_bytes(opt, p) == n * sum(schemes[scheme][k] for k in parts) == n * 2 + 2 * 4 * n // 256


# ----------------------------------------------------------------------------- NF4 and memory

def test_nf4_bits_per_param_with_and_without_double_quant():
    assert budget.nf4_bits_per_param(double_quant=False) == 4 + 32 / 64 == 4.5
    assert budget.nf4_bits_per_param() == 4 + 8 / 64 + 32 / (64 * 256) == 4.126953125


def test_full_finetune_memory_of_8b_is_16_bytes_per_param(llama8b):
    n = 8_030_261_248
    est = budget.full_finetune_memory(llama8b)
    assert dict(est.breakdown) == {
        "weights (bf16)": 2 * n, "gradients (bf16)": 2 * n, "fp32 master weights": 4 * n,
        "Adam m (fp32)": 4 * n, "Adam v (fp32)": 4 * n,
    }
    assert est.total_bytes == 16 * n == 128_484_179_968
    assert est.params_total == est.params_trainable == 8_030_261_248
    assert est.gb == pytest.approx(128.484179968)
    assert est.gib == pytest.approx(128_484_179_968 / 2**30)


@pytest.mark.parametrize("name", SHIPPED)
def test_qlora_uses_less_memory_than_lora_than_full_finetuning(name):
    cfg = budget.load_config(name)
    full = budget.full_finetune_memory(cfg)
    lora = budget.lora_memory(cfg, 16, "all-linear")
    qlora = budget.qlora_memory(cfg, 16, "all-linear")
    qlora_no_dq = budget.qlora_memory(cfg, 16, "all-linear", double_quant=False)
    assert qlora.total_bytes < qlora_no_dq.total_bytes < lora.total_bytes < full.total_bytes


def test_lora_memory_is_2_bytes_per_base_param_plus_16_per_lora_param(llama8b):
    n, p = 8_030_261_248, 41_943_040
    est = budget.lora_memory(llama8b, 16, "all-linear")
    assert est.total_bytes == 2 * n + 16 * p
    assert (est.params_total, est.params_trainable) == (n + p, p)


def test_qlora_memory_stores_only_decoder_linear_weights_in_nf4(llama8b):
    n, p = 8_030_261_248, 41_943_040
    n_lin = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    assert budget.decoder_linear_param_count(llama8b) == n_lin
    est = budget.qlora_memory(llama8b, 16, "all-linear")
    assert est.total_bytes == n_lin * 4.126953125 / 8 + 2 * (n - n_lin) + 16 * p


def test_memory_breakdown_is_read_only(llama8b):
    est = budget.full_finetune_memory(llama8b)
    with pytest.raises(TypeError):
        est.breakdown["Adam m (fp32)"] = 0


# ----------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("r, exc, match", [
    (0, ValueError, "r=0"),
    (-1, ValueError, "r=-1"),
    (2.5, TypeError, "r=2.5"),
    (True, TypeError, "r=True"),
    (2048, ValueError, r"r=2048 exceeds min\(d, k\) = min\(1024, 4096\)"),   # k_proj is 4096 -> 1024
])
def test_bad_rank_is_rejected_with_its_value(llama8b, r, exc, match):
    with pytest.raises(exc, match=match):
        budget.lora_param_count(llama8b, r, "attention")


def test_unknown_module_name_is_named_and_valid_names_listed(llama8b):
    with pytest.raises(ValueError, match=r"'qkv_proj'.*'q_proj'"):
        budget.lora_param_count(llama8b, 16, ["qkv_proj"])
    # as in PEFT, a list needs only one name to match: the others select nothing
    assert budget.lora_param_count(llama8b, 16, ["q_proj", "qkv_proj"]) == budget.lora_param_count(llama8b, 16, ["q_proj"])


def test_unknown_target_set_is_named(llama8b):
    with pytest.raises(ValueError, match=r"'all_linear'.*shorthands.*all-linear"):
        budget.lora_param_count(llama8b, 16, "all_linear")
    with pytest.raises(ValueError, match=r"\['q_proj'\]"):          # a bare module name
        budget.lora_param_count(llama8b, 16, "q_proj")


def test_missing_config_key_is_named(llama8b):
    cfg = {k: v for k, v in llama8b.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match="missing the key 'intermediate_size'"):
        budget.base_param_count(cfg)


def test_bad_config_values_are_named():
    with pytest.raises(TypeError, match="hidden_size='4096'"):
        budget.linear_shapes(dict(hidden_size="4096", intermediate_size=8, num_attention_heads=8))
    with pytest.raises(ValueError, match="num_attention_heads=32 is not a multiple of num_key_value_heads=5"):
        budget.linear_shapes(dict(hidden_size=64, intermediate_size=8, num_attention_heads=32,
                                  num_key_value_heads=5))


# ----------------------------------------------------------------------------- oracles: transformers and PEFT

def _meta_model(cfg):
    """The real transformers model for cfg, on the meta device (shapes only, no memory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.utils.logging.set_verbosity_error()
    hf = {k: v for k, v in cfg.items() if not k.startswith("_")}
    with torch.device("meta"):
        config = transformers.AutoConfig.for_model(**hf)
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", SHIPPED)
def test_base_count_equals_transformers_model_numel(name):
    cfg = budget.load_config(name)
    model = _meta_model(cfg)
    assert budget.base_param_count(cfg) == sum(p.numel() for p in model.parameters())
    # the shapes too: W0 = nn.Linear(k, d).weight is (d, k)
    layer0 = model.model.layers[0]
    for name_, shape in budget.linear_shapes(cfg).items():
        parent = layer0.self_attn if name_ in ("q_proj", "k_proj", "v_proj", "o_proj") else layer0.mlp
        assert tuple(getattr(parent, name_).weight.shape) == shape


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", ["llama-3.1-8b", "mistral-7b", "llama-2-7b"])
@pytest.mark.parametrize("targets", ["qv", "attention", "all-linear"])
def test_lora_count_equals_peft_trainable_count(name, targets):
    peft = pytest.importorskip("peft")
    cfg = budget.load_config(name)
    # "all-linear" goes to PEFT as its own shorthand, so PEFT decides which layers that means
    peft_targets = targets if targets == "all-linear" else list(budget.resolve_targets(targets))
    model = peft.get_peft_model(_meta_model(cfg), peft.LoraConfig(r=16, target_modules=peft_targets))
    trainable, everything = model.get_nb_trainable_parameters()
    assert trainable == budget.lora_param_count(cfg, 16, targets)
    assert everything == budget.base_param_count(cfg) + trainable
    if name == LLAMA_8B and targets == "all-linear":
        assert (trainable, everything) == (41_943_040, 8_072_204_288)


# ----------------------------------------------------------------------------- forward cost

@pytest.mark.parametrize("d, k, r", [(8, 8, 2), (16, 6, 3), (4096, 4096, 16)])
def test_forward_macs_match_counted_matmuls(d, k, r):
    """Each formula is the sum of the (m, n) @ (n, p) products it does: m n p MACs each."""
    mm = lambda m, n, p: m * n * p
    for T in (1, 7, 128):
        assert budget.forward_macs(T, d, k, r, "base") == mm(T, k, d)
        assert budget.forward_macs(T, d, k, r, "factored") == mm(T, k, d) + mm(T, k, r) + mm(T, r, d)
        assert budget.forward_macs(T, d, k, r, "materialised") == mm(d, r, k) + mm(T, k, d)


@pytest.mark.parametrize("d, k", [(1024, 1024), (4096, 1024), (4096, 14336)])
def test_materialised_forward_is_cheaper_exactly_above_the_crossover(d, k):
    t_star = budget.materialise_crossover_tokens(d, k)
    for r in (1, 8, 64):
        for T in range(max(1, int(t_star) - 3), int(t_star) + 4):
            fac = budget.forward_macs(T, d, k, r, "factored")
            mat = budget.forward_macs(T, d, k, r, "materialised")
            assert (mat < fac) == (T > t_star), (T, t_star)
    assert budget.materialise_crossover_tokens(4096, 4096) == 2048


def test_forward_macs_bad_input():
    with pytest.raises(ValueError, match=r"how must be 'base', 'factored' or 'materialised', got how='fused'"):
        budget.forward_macs(1, 4, 4, 2, "fused")
    with pytest.raises(ValueError, match=r"T must be a positive integer, got T=0"):
        budget.forward_macs(0, 4, 4, 2)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("targets", [
    r".*layers\.1\.mlp\.(gate|up|down)_proj",            # one layer's MLP
    r".*layers\.(0|3)\.self_attn\.(q|v)_proj",           # q and v of two layers
    r"model\.layers\.\d+\.self_attn\.o_proj",             # a regex over every layer
    ["layers.2.mlp.down_proj", "q_proj"],                 # a list with a layer-indexed suffix
])
def test_layer_indexed_targets_count_what_peft_trains(targets):
    """budget matches full module names of every layer, as PEFT does, so the counts agree."""
    peft = pytest.importorskip("peft")
    cfg = dict(budget.load_config("llama-3.1-8b"), num_hidden_layers=4)
    model = peft.get_peft_model(_meta_model(cfg), peft.LoraConfig(r=8, target_modules=targets))
    trainable, _ = model.get_nb_trainable_parameters()
    assert budget.lora_param_count(cfg, 8, targets) == trainable
    adapted = {n.rsplit(".lora_A", 1)[0].removeprefix("base_model.model.") for n, _ in model.named_parameters()
               if ".lora_A." in n}
    block = lambda m: "self_attn" if m in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    assert {f"model.layers.{i}.{block(m)}.{m}" for i, m in budget.selected_linears(cfg, targets)} == adapted
