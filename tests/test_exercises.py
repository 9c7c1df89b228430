"""The exercise checkers: an answer at the precision the question states passes, one unit off in
its last stated figure fails with a hint, and no answer says so.

The expected values are written here as closed forms from the models' shapes and the papers, not
computed with the checkers' own expressions.
"""

import math
import re

import pytest

from lora_ref import budget
from lora_ref import exercises as ex

# Mistral-7B (config.json): vocab 32000, hidden 4096, 32 layers, MLP 14336, 8 KV heads of 128, untied lm_head.
MISTRAL_7B_PARAMS = (2 * 32000 * 4096                                   # embed_tokens + lm_head
                     + 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024          # q, o; k, v
                             + 3 * 4096 * 14336 + 2 * 4096)             # gate, up, down; two RMSNorms
                     + 4096)                                            # final norm
# Llama-3.1-8B: r (d_in + d_out) per projection, 32 layers; k, v map 4096 -> 1024, the MLP 4096 <-> 14336.
LLAMA_8B_QV_PER_RANK = 32 * ((4096 + 4096) + (4096 + 1024))
LLAMA_8B_ALL_LINEAR_PER_RANK = 32 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
# Llama-3.1-70B: hidden 8192, 80 layers, 8 KV heads of 128, so k, v map 8192 -> 1024.
LLAMA_70B_ATTENTION_PER_RANK = 80 * (2 * (8192 + 8192) + 2 * (8192 + 1024))
# bitsandbytes' NF4 levels (QLoRA, appendix E), sorted: index 7 is the zero.
NF4_LEVELS = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
              0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]


def _nearest_nf4_index(v):
    return min(range(16), key=lambda i: abs(NF4_LEVELS[i] - v))


# (id, checker, the exact answer, right answers at the stated precision, near misses one unit off)
CASES = [
    ("ch01_lora_params", lambda a: ex.ch01_lora_params(a, model="llama-3.1-70b", r=8, target_modules="attention"),
     8 * LLAMA_70B_ATTENTION_PER_RANK, [32_768_000], [32_767_999, 32_768_001]),
    ("ch01_full_finetune_gb", lambda a: ex.ch01_full_finetune_gb(a, model="mistral-7b"),
     16 * MISTRAL_7B_PARAMS / 1e9, [115.9, 115.87], [116.0, 115.8]),
    ("ch01_rank_for_equal_size", lambda a: ex.ch01_rank_for_equal_size(a, model="llama-3.1-8b", r_small=64),
     64 * LLAMA_8B_QV_PER_RANK / LLAMA_8B_ALL_LINEAR_PER_RANK, [10.40, 10.4], [10.41, 10.39]),
    ("ch02_forward_by_hand", lambda a: ex.ch02_forward_by_hand(a, x=(0.0, 1.0, -1.0)),
     [2.0, 0.0], [[2, 0], [[2], [0]], [[2, 0]]], [[3, 0], [1, 0], [2, 1], [2, -1]]),
    ("ch02_crossover_tokens", lambda a: ex.ch02_crossover_tokens(a, d=4096, k=11008),
     4096 * 11008 / (4096 + 11008), [2985.2, 2985.22], [2985.3, 2985.1]),
    ("ch02_bf16_spacing", ex.ch02_bf16_spacing,
     2.0**-7, [0.0078125], [2.0**-8, 2.0**-6]),
    ("ch03_lr_B_factor", lambda a: ex.ch03_lr_B_factor(a, c=4, optimizer="adam"),
     4.0, [4, 4.0], [3, 5]),
    ("ch03_rank_exponent", lambda a: ex.ch03_rank_exponent(a, e=-0.25, optimizer="sgd"),
     2 * (-1 / 4) + 1, [0.5], [0.4, 0.6, 1.5]),
    ("ch03_retune_factor", lambda a: ex.ch03_retune_factor(a, r_from=16, r_to=64, rule="alpha/r", optimizer="sgd"),
     64 / 16, [4, 4.00], [4.01, 3.99]),
    ("ch04_kaiming_variance", lambda a: ex.ch04_kaiming_variance(a, k=4096),
     1 / (3 * 4096), [8.138e-5, 8.1380e-5, 8.13802e-5], [8.139e-5, 8.137e-5]),
    ("ch04_false_init_std", lambda a: ex.ch04_false_init_std(a, k=4096),
     1 / 192, [5.208e-3, 0.0052083], [5.209e-3, 5.207e-3]),
    ("ch04_first_step_exponent", lambda a: ex.ch04_first_step_exponent(a, "adam", "gaussian", "alpha/sqrt(r)"),
     -0.5, [-0.5, -1 / 2], [-0.4, -0.6, 0.5, -1.0]),
    ("ch08_bits_per_weight", lambda a: ex.ch08_bits_per_weight(a, blocksize=32),
     4 + 8 / 32 + 32 / (32 * 256), [4.2539, 4.25391], [4.2540, 4.2538]),
    ("ch08_nf4_code", lambda a: ex.ch08_nf4_code(a, w=0.3, absmax=1.2),
     _nearest_nf4_index(0.3 / 1.2), [10], [9, 11]),
    # p = (1/2, 1/4, 1/8, 1/8): erank = prod p_i^(-p_i) = 2^(1/2) 4^(1/4) 8^(1/8) 8^(1/8) = 2^(7/4) = 3.3636
    ("ch07_effective_rank", lambda a: ex.ch07_effective_rank(a, sigma=(4, 2, 1, 1)),
     2 ** (7 / 4), [3.364, 3.3636], [3.363, 3.365]),
    # E[phi] = max(i, j) / k = 16 / 128
    ("ch07_random_similarity", lambda a: ex.ch07_random_similarity(a, i=4, j=16, k=128),
     1 / 8, [0.125, 1 / 8], [0.124, 0.126, 4 * 16 / 128, 4 / 128]),
    # ||Delta W||_F / (r ||W0||_F / sqrt(d k)) = 3.57 * 12288 / (64 * 61.95) = 11.064
    ("ch07_random_amplification", lambda a: ex.ch07_random_amplification(a),
     3.57 * 12288 / (64 * 61.95), [11.1, 11.06], [11.0, 11.2]),
    # chapter 05: chapter 02's worked example (s = 2, B = (2, -1), x = (1, 2, 3)) with ybar = (1, 1): B^T ybar = 1
    ("ch05_grad_A_by_hand", lambda a: ex.ch05_grad_A_by_hand(a, grad_y=(1.0, 1.0)),
     [2.0, 4.0, 6.0], [[2, 4, 6], [[2, 4, 6]], [[2], [4], [6]]], [[2, 4, 7], [3, 4, 6], [1, 2, 3], [2, 4]]),
    ("ch05_adam_first_step", lambda a: ex.ch05_adam_first_step(a, beta1=0.9, beta2=0.999),
     (1.999) ** 0.5 / 1.9, [0.7441, 0.74414], [0.7442, 0.7440]),
    ("ch05_backward_mac_ratio", lambda a: ex.ch05_backward_mac_ratio(a, d=4096, k=4096, r=16),
     2 / 3 + 16 * 8192 / 4096**2, [0.6745, 0.67448], [0.6746, 0.6744]),
    ("ch05_loraplus_alpha", lambda a: ex.ch05_loraplus_alpha(a, alpha=16.0, ratio=16.0, r=8),
     16 * 16, [256, 256.0], [255, 257, 16]),
    # chapter 06: diag(5, 3, 2, 1) at r = 2 drops 2 and 1; sigma_i = 0.9^(i-1) keeps (1 - 0.81^r) / (1 - 0.81^128)
    ("ch06_eckart_young_error", lambda a: ex.ch06_eckart_young_error(a, sigma=(5.0, 3.0, 2.0, 1.0), r=2),
     math.sqrt(2**2 + 1**2), [2.236, 2.2361], [2.237, 2.235, 2.0, 3.0]),
    ("ch06_rank_for_energy", lambda a: ex.ch06_rank_for_energy(a, rho=0.9, n=128, tau=0.9),
     math.ceil(math.log(1 - 0.9 * (1 - 0.81**128)) / math.log(0.81)), [11], [10, 12]),
    ("ch06_saddle_loss", lambda a: ex.ch06_saddle_loss(a, sigma=(4.0, 3.0, 2.0, 1.0), kept=(1, 3)),
     0.5 * (3**2 + 1**2), [5, 5.0], [4, 6, 2.5, 10]),
    # chapter 09: c = (0.3 * 2, -0.6 * 0.5) = (0.6, -0.3); B = sqrt(0.6) B1 + sqrt(0.3) B2, A = sqrt(0.6) A1 - sqrt(0.3) A2
    ("ch09_linear_cross_term", lambda a: ex.ch09_linear_cross_term(a, w=(0.3, -0.6), s=(2.0, 0.5)),
     -math.sqrt(0.6 * 0.3), [-0.4243, -0.42426], [-0.4242, -0.4244, 0.4243, -0.18]),
    # Llama-3.1-8B: N = 8,030,261,248, P(r=16, all-linear) = 41,943,040; (80e9 - 20e9 - 2N) / 2P = 523.8
    ("ch09_adapters_that_fit", lambda a: ex.ch09_adapters_that_fit(a, r=16, memory_gb=80, reserved_gb=20),
     (80 * 10**9 - 20 * 10**9 - 2 * 8_030_261_248) // (2 * 41_943_040), [523], [522, 524]),
    # every row pays for rank 64: 1 - (4 + 8 + 64) / (3 * 64) = 29/48
    ("ch09_padding_overhead", lambda a: ex.ch09_padding_overhead(a, ranks=(4, 8, 64), rows=(1, 1, 1)),
     29 / 48, [0.6042, 0.60417], [0.6041, 0.6043, 1 - 29 / 48]),
    # chapter 10: diag(5, 3, 2, 1), r = 2: PiSSA keeps 2, 1 in W_res, MiLoRA keeps 5, 3
    ("ch10_residual_norms", lambda a: ex.ch10_residual_norms(a, sigma=(5.0, 3.0, 2.0, 1.0), r=2),
     (math.sqrt(5), math.sqrt(34)), [(2.236, 5.831), (2.2361, 5.8310)], [(2.237, 5.831), (5.831, 2.236), (3.0, 5.831)]),
    # r' = 2r = 32 at s = 32 / sqrt(16) = 8: alpha' = 8 sqrt(32) = 32 sqrt(2)
    ("ch10_conversion_config", lambda a: ex.ch10_conversion_config(a, r=16, alpha=32.0, rslora=True),
     (32, 32 * math.sqrt(2)), [(32, 32 * math.sqrt(2))], [(32, 64.0), (16, 45.254834), (32, 45.25)]),
    # sum k = 6 * 4096 + 14336 = 38912 over 7 layers: r >= 5558.86
    ("ch10_vera_rank_for_lora_budget", lambda a: ex.ch10_vera_rank_for_lora_budget(a, model="llama-3.1-8b"),
     5559, [5559], [5558, 5560, 38912]),
    # PiSSA's factors span e_1; the residual 0.5 e_4 e_4^T is orthogonal: nothing moves
    ("ch10_stuck_error", lambda a: ex.ch10_stuck_error(a, sigma=(4.0, 3.0, 2.0, 1.0), r=1, planted=0.5),
     0.5, [0.5, 0.50001], [0.0, 0.4999, 0.25]),
    # chapter 11: s r goes from 16 / 16 * 16 = 16 to 128 / 64 * 64 = 128, so lr / 8
    ("ch11_predicted_lr", lambda a: ex.ch11_predicted_lr(a, lr=5e-3, r=16, alpha=16.0, r_new=64, alpha_new=128.0),
     5e-3 / 8, [6.25e-4, 0.000625], [6.26e-4, 5e-3 / 4, 4e-2]),
    # columns (1, 0), (2, 1), (0, -1) against x^2 = 1, 4, 9: 1 + 20 + 9 = 30, times 0.2 / 0.8
    ("ch11_dropout_variance", lambda a: ex.ch11_dropout_variance(a, delta_W=((1.0, 2.0, 0.0), (0.0, 1.0, -1.0)),
                                                                  x=(1.0, -2.0, 3.0), dropout=0.2),
     7.5, [7.5, 7.5001], [7.502, 6.0, 30.0]),
    # 2 = 16 / sqrt(r)
    ("ch11_equal_scale_rank", lambda a: ex.ch11_equal_scale_rank(a, c=2.0, alpha=16.0), 64, [64, 64.0], [8, 63, 128]),
    # all-linear: 81,920 per rank in one layer, qv: 8192 + 5120 = 13,312; 4 * 81920 / 13312 = 24.6
    ("ch11_equal_budget_rank", lambda a: ex.ch11_equal_budget_rank(a, model="llama-3.1-8b", targets="qv"),
     25, [25], [24, 26, 4]),
    # chapter 12: q (4096, 4096) and v (1024, 4096): 16 * (8192 + 5120) * 32 layers * 4 bytes
    ("ch12_ddp_bytes", lambda a: ex.ch12_ddp_bytes(a, model="llama-3.1-8b", r=16, target_modules="qv"),
     27_262_976, [27_262_976], [6_815_744, 13_631_488, 27_262_977]),
    # 2 (W - 1) / W of the buffer: 14 chunks of 1/8
    ("ch12_ring_bytes", lambda a: ex.ch12_ring_bytes(a, n_bytes=800, world_size=8), 1400, [1400, 1400.0],
     [1600, 800, 700]),
    # 4 (65,664 + 2 * 4 * 200,000): the tiny model's root and its four layers with LoRA at r = 8
    ("ch12_fsdp_gather_bytes", lambda a: ex.ch12_fsdp_gather_bytes(a, r=8), 6_662_656, [6_662_656],
     [3_462_656, 3_166_720, 6_662_657]),
    # 144.4 GB / W + 3.43 GB <= 24 GB first at W = 8; QLoRA's 42.8 GB / W + 0.9 GB at W = 2
    ("ch12_gpus_needed", lambda a: ex.ch12_gpus_needed(a, strategy="FSDP + LoRA", gpu_gb=24.0), 8, [8], [7, 6, 9]),
]
IDS = [c[0] for c in CASES]
CHECKERS = {c[0]: c[1] for c in CASES}


def test_the_closed_forms_match_the_stated_values():
    assert MISTRAL_7B_PARAMS == 7_241_732_096
    assert 64 * LLAMA_8B_QV_PER_RANK / LLAMA_8B_ALL_LINEAR_PER_RANK == 10.4
    assert _nearest_nf4_index(0.25) == 10
    assert 8 * LLAMA_70B_ATTENTION_PER_RANK == budget.lora_param_count(budget.load_config("llama-3.1-70b"), 8,
                                                                       "attention")


def test_every_checker_in_the_module_is_tested():
    assert sorted(IDS) == sorted(n for n in ex.__all__ if re.fullmatch(r"ch\d\d_\w+", n))


@pytest.mark.parametrize("name, checker, exact, right, wrong", CASES, ids=IDS)
def test_checker_accepts_the_exact_answer(name, checker, exact, right, wrong):
    v = checker(exact)
    assert v and repr(v).startswith("✓")


@pytest.mark.parametrize("name, checker, exact, right, wrong", CASES, ids=IDS)
def test_checker_accepts_an_answer_rounded_to_the_stated_precision(name, checker, exact, right, wrong):
    for answer in right:
        v = checker(answer)
        assert v and repr(v).startswith("✓"), (answer, repr(v))


@pytest.mark.parametrize("name, checker, exact, right, wrong", CASES, ids=IDS)
def test_checker_rejects_an_answer_one_unit_off_in_the_last_stated_figure(name, checker, exact, right, wrong):
    for answer in wrong:
        v = checker(answer)
        assert not v and repr(v).startswith("✗") and "Hint:" in repr(v), (answer, repr(v))


@pytest.mark.parametrize("name, checker, exact, right, wrong", CASES, ids=IDS)
def test_checker_says_when_there_is_no_answer(name, checker, exact, right, wrong):
    v = checker(None)
    assert not v and "no answer yet" in repr(v)


@pytest.mark.parametrize("name", ["ch01_full_finetune_gb", "ch01_rank_for_equal_size",
                                  "ch02_crossover_tokens", "ch08_bits_per_weight",
                                  "ch09_linear_cross_term", "ch09_padding_overhead"])
def test_checkers_with_significant_figures_say_how_many(name):
    assert "significant figures" in repr(CHECKERS[name](None))


def test_forward_by_hand_wants_two_numbers_and_says_exact():
    assert not ex.ch02_forward_by_hand([2.0, 0.0, 0.0])
    assert not ex.ch02_forward_by_hand([[2.0, 0.0], [0.0, 0.0]])
    assert not ex.ch02_forward_by_hand("two")
    assert not ex.ch02_forward_by_hand([2.0 + 1e-9, 0.0])
    assert "(exact)" in repr(ex.ch02_forward_by_hand([2.0, 0.0]))


def test_bf16_spacing_explains_the_half_spacing_answer():
    v = ex.ch02_bf16_spacing(2.0**-8)
    assert not v and "half the spacing" in repr(v)
    assert "half the spacing" not in repr(ex.ch02_bf16_spacing(2.0**-6))
    assert "(exact)" in repr(ex.ch02_bf16_spacing(2.0**-7))


def test_check_uses_its_tolerance():
    assert ex.check("x", 1.0, 1.0 + 1e-12, rtol=1e-9)
    assert not ex.check("x", 1.0, 1.0 + 1e-6, rtol=1e-9)


def test_nf4_code_checker_agrees_with_bitsandbytes_at_the_rounding_edges():
    """The checker's code is bitsandbytes' code, also for w / c on a midpoint between two levels,
    where an argmin over |v - w / c| may pick the other neighbour."""
    import bitsandbytes.functional as bnbF
    import torch

    from lora_ref import quant
    levels = quant.nf4_codebook()
    for mid in ((levels[1:] + levels[:-1]) / 2).tolist():
        block = torch.zeros(64)
        block[0], block[1] = mid, 1.0                               # absmax 1: w / c = the midpoint
        packed, _ = bnbF.quantize_4bit(block, blocksize=64, quant_type="nf4", compress_statistics=False)
        theirs = int(packed.reshape(-1)[0]) >> 4                     # the first element: the high nibble
        assert ex.ch08_nf4_code(theirs, w=mid, absmax=1.0), (mid, theirs)


def test_float_spacing_checker_takes_the_mantissa_width():
    """The assignments ask the bf16 question for other formats: p stored bits give spacing 2^-p in [1, 2)."""
    assert ex.ch02_bf16_spacing(2.0**-10, mantissa_bits=10)                 # fp16
    assert ex.ch02_bf16_spacing(2.0**-23, mantissa_bits=23)                 # fp32
    assert not ex.ch02_bf16_spacing(2.0**-7, mantissa_bits=10)
    assert "half the spacing" in repr(ex.ch02_bf16_spacing(2.0**-11, mantissa_bits=10))
    with pytest.raises(ValueError, match="mantissa_bits"):
        ex.ch02_bf16_spacing(0.5, mantissa_bits=0)
