"""The exercise checkers: the right answer passes, a wrong one fails with a hint, no answer says so."""

import pytest
import torch

from lora_ref import budget
from lora_ref import exercises as ex


CASES = [
    (lambda a: ex.ch01_lora_params(a, model="llama-3.1-70b", r=8, target_modules="attention"), 32_768_000),
    (lambda a: ex.ch01_full_finetune_gb(a, model="mistral-7b"), 16 * 7_241_732_096 / 1e9),
    (lambda a: ex.ch01_rank_for_equal_size(a), 64 * 6_815_744 / 41_943_040),
    (lambda a: ex.ch02_forward_by_hand(a, x=(0.0, 1.0, -1.0)), [2.0, 0.0]),
    (lambda a: ex.ch02_crossover_tokens(a, d=4096, k=11008), 4096 * 11008 / (4096 + 11008)),
    (lambda a: ex.ch02_bf16_spacing(a), torch.finfo(torch.bfloat16).eps),
    (lambda a: ex.ch08_bits_per_weight(a, blocksize=32), 4 + 8 / 32 + 32 / (32 * 256)),
    (lambda a: ex.ch08_nf4_code(a, w=0.3, absmax=1.2), 10),
]


@pytest.mark.parametrize("checker, right", CASES)
def test_checker_accepts_the_right_answer(checker, right):
    v = checker(right)
    assert v and repr(v).startswith("✓")


@pytest.mark.parametrize("checker, right", CASES)
def test_checker_rejects_a_wrong_answer_with_a_hint(checker, right):
    wrong = [x * 1.1 + 1 for x in right] if isinstance(right, list) else right * 1.1 + 1
    v = checker(wrong)
    assert not v and repr(v).startswith("✗") and "Hint:" in repr(v)


@pytest.mark.parametrize("checker, right", CASES)
def test_checker_says_when_there_is_no_answer(checker, right):
    v = checker(None)
    assert not v and "no answer yet" in repr(v)


def test_checker_rejects_answers_of_the_wrong_shape_or_type():
    assert not ex.ch02_forward_by_hand([2.0, 0.0, 0.0])
    assert not ex.ch02_forward_by_hand("two")


def test_chapter_01_checker_expectations_come_from_the_budget_module():
    assert 80 * 8 * (2 * 16384 + 2 * 9216) == budget.lora_param_count(budget.load_config("llama-3.1-70b"), 8, "attention")



def test_check_uses_its_tolerance():
    assert ex.check("x", 1.0, 1.0 + 1e-12, rtol=1e-9)
    assert not ex.check("x", 1.0, 1.0 + 1e-6, rtol=1e-9)
