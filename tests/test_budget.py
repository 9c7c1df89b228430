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
SHIPPED = ["llama-3.1-8b", "llama-3.1-70b", "mistral-7b", "qwen2-72b"]


@pytest.fixture(scope="module")
def llama8b():
    return budget.load_config(LLAMA_8B)


# ----------------------------------------------------------------------------- configs

def test_shipped_configs_are_the_four_models_with_their_hub_source():
    assert budget.available_configs() == sorted(SHIPPED)
    sources = {name: budget.load_config(name)["_source"] for name in SHIPPED}
    assert sources == {
        "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
        "llama-3.1-70b": "meta-llama/Llama-3.1-70B",
        "mistral-7b": "mistralai/Mistral-7B-v0.1",
        "qwen2-72b": "Qwen/Qwen2-72B",
    }


def test_llama_3_1_8b_config_has_the_published_shapes(llama8b):
    expected = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                    tie_word_embeddings=False, rope_theta=500000.0,
                    max_position_embeddings=131072, rms_norm_eps=1e-05)
    assert {k: llama8b[k] for k in expected} == expected


def test_unknown_config_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"'llama-9b'.*llama-3\.1-8b"):
        budget.load_config("llama-9b")


# ----------------------------------------------------------------------------- shapes

def test_gqa_makes_k_and_v_proj_4096_to_1024_in_llama_3_1_8b(llama8b):
    assert budget.linear_shapes(llama8b) == {
        "q_proj": (4096, 4096), "k_proj": (4096, 1024), "v_proj": (4096, 1024),
        "o_proj": (4096, 4096), "gate_proj": (4096, 14336), "up_proj": (4096, 14336),
        "down_proj": (14336, 4096),
    }


def test_head_dim_defaults_to_hidden_over_heads_and_kv_heads_to_heads():
    cfg = dict(hidden_size=64, intermediate_size=128, num_attention_heads=8)
    assert budget.linear_shapes(cfg)["k_proj"] == (64, 64)                     # no GQA
    assert budget.linear_shapes({**cfg, "head_dim": 16})["q_proj"] == (64, 128)  # explicit head_dim


def test_named_target_sets_resolve_to_module_names():
    assert budget.resolve_targets("qv") == ("q_proj", "v_proj")
    assert budget.resolve_targets("attention") == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert budget.resolve_targets("all-linear") == budget.LINEAR_MODULES
    assert budget.resolve_targets(["v_proj", "q_proj", "v_proj"]) == ("q_proj", "v_proj")


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


def test_adapter_bytes_is_lora_count_times_bytes_per_param(llama8b):
    assert budget.adapter_bytes(llama8b, 16, "all-linear") == 2 * 41_943_040
    assert budget.adapter_bytes(llama8b, 16, "all-linear", bytes_per_param=4) == 4 * 41_943_040


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


def test_ignoring_gqa_gives_the_published_8_4M_for_qv_at_r16(llama8b):
    # v_proj taken as 4096 -> 4096 instead of 4096 -> 1024:  32 * 16 * (8192 + 8192)
    wrong = budget.lora_param_count_ignoring_gqa(llama8b, 16, "qv")
    assert wrong == 32 * 16 * (8192 + 8192) == 8_388_608
    assert _millions(wrong) == "8.4M"
    assert budget.lora_param_count(llama8b, 16, "qv") == 32 * 16 * ((4096 + 4096) + (4096 + 1024))


def test_full_finetune_of_8b_is_128_GB_not_72(llama8b):
    assert f"{budget.full_finetune_memory(llama8b).gb:.0f}" == "128"


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
    assert est.total_bytes == sum(est.breakdown.values()) == 16 * n == 128_484_179_968
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
        budget.lora_param_count(llama8b, 16, ["q_proj", "qkv_proj"])


def test_unknown_target_set_is_named(llama8b):
    with pytest.raises(ValueError, match=r"'all_linear'.*all-linear"):
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
    # the shapes too: nn.Linear(d_in, d_out).weight is (d_out, d_in)
    layer0 = model.model.layers[0]
    for name_, (d_in, d_out) in budget.linear_shapes(cfg).items():
        parent = layer0.self_attn if name_ in budget.TARGET_SETS["attention"] else layer0.mlp
        assert tuple(getattr(parent, name_).weight.shape) == (d_out, d_in)


@pytest.mark.filterwarnings("ignore::FutureWarning")
@pytest.mark.parametrize("name", ["llama-3.1-8b", "mistral-7b"])
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
