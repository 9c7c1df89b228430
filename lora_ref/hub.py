"""QLoRA on a Hugging Face model, as a learner runs it in Colab: one function, tested on CPU.

``qlora_fine_tune(model, device, train, test, steps)`` runs the real stack on any causal LM
that ``from_pretrained`` reads (a hub name, or a local directory such as the tiny model that
``python -m lora_ref.tiny export DIR`` writes):

1. ``AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(
   load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, ...))``:
   every linear layer but lm_head becomes a bitsandbytes ``Linear4bit`` (NF4, blocks of 64,
   double-quantised constants);
2. ``prepare_model_for_kbit_training``: freezes the base, upcasts its 16-bit rest to fp32,
   turns on gradient checkpointing (non-reentrant);
3. PEFT ``LoraConfig(target_modules="all-linear")``: LoRA on those linear layers, in fp32;
4. ``bitsandbytes.optim.PagedAdamW8bit`` (paged on a GPU; on a CPU bitsandbytes runs it
   unpaged); ``torch.optim.AdamW`` on devices bitsandbytes has no 8-bit optimizer for.

Batches and exact match go through the model's own tokenizer: prompt and answer are
tokenised apart (so the answer's tokens are those generation must produce), the loss falls
on the answer tokens and EOS only, and exact match is greedy generation up to EOS.
``lora_ref.budget.qlora_training_memory`` predicts the bytes that training holds;
``held_bytes`` measures them, term by term.

``should_run`` decides whether a chapter runs this path, from ``LORA_BOOK_HUB_MODEL`` and
the device. transformers, PEFT and bitsandbytes are imported inside the functions.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import NamedTuple

from . import budget
from .output import quiet

__all__ = ["HUB_MODEL_ENV", "DEFAULT_HUB_MODEL", "HubPlan", "hub_model_name", "should_run",
           "QLoRAResult", "qlora_fine_tune", "load_qlora_model", "disable_cpu_bf16_repack",
           "make_batch", "generate_answers", "exact_match", "held_bytes"]

HUB_MODEL_ENV = "LORA_BOOK_HUB_MODEL"
DEFAULT_HUB_MODEL = "Qwen/Qwen2.5-0.5B"      # Apache-2.0, no licence to accept, fits a free Colab T4
_OPTIMIZER_DEVICES = ("cuda", "cpu")        # where bitsandbytes 0.50 runs its 8-bit blockwise Adam


# ----------------------------------------------------------------------------- which model, which device


def hub_model_name(default=DEFAULT_HUB_MODEL):
    """The model the chapter fine-tunes: ``$LORA_BOOK_HUB_MODEL`` if set (a hub name or a
    local directory), else ``default``."""
    return os.environ.get(HUB_MODEL_ENV, "").strip() or default


class HubPlan(NamedTuple):
    """Whether the hub path runs, on which model and device, and why, in one sentence."""

    run: bool
    model: str | None
    device: str | None
    reason: str


def should_run(gpu_available=None, default=DEFAULT_HUB_MODEL):
    """The rule for the hub path.

    - a GPU: run ``hub_model_name(default)`` on it ("cuda:0");
    - no GPU but ``$LORA_BOOK_HUB_MODEL`` set: run that model on the CPU;
    - no GPU and no variable: skip (a 0.5B model takes far too long on a CPU, and a GPU-less
      build must not download it), saying so in ``reason``.
    ``gpu_available=None`` asks ``torch.cuda.is_available()``.
    """
    if gpu_available is None:
        import torch

        gpu_available = torch.cuda.is_available()
    variable = os.environ.get(HUB_MODEL_ENV, "").strip()
    model = hub_model_name(default)
    if gpu_available:
        return HubPlan(True, model, "cuda:0", f"A GPU is present: fine-tuning {model} in 4 bits on it.")
    if variable:
        return HubPlan(True, model, "cpu", f"No GPU, but {HUB_MODEL_ENV} names {model}: fine-tuning it on the CPU.")
    return HubPlan(False, None, None,
                   f"No GPU and {HUB_MODEL_ENV} is not set, so the hub-model path is skipped: set it to a "
                   f"model name or to a directory written by `python -m lora_ref.tiny export DIR` to run it here.")


# ----------------------------------------------------------------------------- the model


def disable_cpu_bf16_repack(model):
    """Switch ``support_avx512bf16_for_cpu`` off on every bitsandbytes ``Linear4bit`` of ``model``;
    returns how many layers it touched.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a Linear4bit's weight for a bf16
    kernel the first time it runs in eval mode or under no_grad; that kernel has no backward,
    so gradients through the layer silently lose the base term (tests/test_quant.py). Call it
    before any evaluation. On a GPU the flag is never read.
    """
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return len(layers)


def _compute_dtype(device):
    """bf16 on a GPU, as QLoRA trains (tensor cores, half the bytes of a dequantised tile); fp32
    on a CPU, where bf16 matmuls are fast only on CPUs with bf16 instructions and fp32 keeps the
    run close to the tiny model's fp32 reference. The stored weights are NF4 either way."""
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def load_qlora_model(name_or_path, device, r=16, alpha=32, compute_dtype=None, gradient_checkpointing=True,
                     seed=0):
    """Steps 1 to 3 of the module docstring: the PeftModel with LoRA (rank r, scale alpha / r) on
    every linear layer of an NF4, double-quantised base on ``device``, and its tokenizer (pad =
    eos when it has none). A is drawn from torch's generator seeded with ``seed``; B = 0."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer of {name_or_path} has no eos_token: answers could not end")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or _compute_dtype(device))
    model = AutoModelForCausalLM.from_pretrained(name_or_path, quantization_config=quantization,
                                                 device_map={"": device})
    if disable_cpu_bf16_repack(model) == 0:
        raise RuntimeError(f"{name_or_path} loaded without any bitsandbytes Linear4bit layer")
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config), tokenizer


# ----------------------------------------------------------------------------- batches and exact match


def _prompt_ids(tokenizer, prompt):
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]          # with BOS where the model has one


def _answer_ids(tokenizer, answer):
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def make_batch(tokenizer, examples, device="cpu"):
    """Model inputs for (prompt, answer) pairs: ``input_ids``, ``attention_mask``, ``labels``,
    each (batch, T), right-padded with the pad id.

    A row is tokens(prompt) + tokens(answer) + [eos], the two texts tokenised apart, so the
    answer's tokens are the ones greedy generation after the prompt has to produce. labels are
    the ids on the answer and eos and -100 elsewhere (prompt, padding): the loss falls on the
    answer only (transformers shifts labels by one inside the model). With the tiny model's
    byte tokenizer this is ``tiny.make_batch`` exactly.
    """
    import torch

    rows, labels = [], []
    for prompt, answer in examples:
        p, a = _prompt_ids(tokenizer, prompt), _answer_ids(tokenizer, answer)
        rows.append(p + a)
        labels.append([-100] * len(p) + a)
    T = max(len(x) for x in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([x + [pad] * (T - len(x)) for x in rows])
    attention_mask = torch.tensor([[1] * len(x) + [0] * (T - len(x)) for x in rows])
    label_ids = torch.tensor([y + [-100] * (T - len(y)) for y in labels])
    return {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device),
            "labels": label_ids.to(device)}


def generate_answers(model, tokenizer, prompts, max_new_tokens, batch_size=64):
    """Greedy continuations of ``prompts``, cut at the first eos (and at a newline), decoded.

    Prompts are left-padded (so every row's next token follows its own last prompt token);
    the model is put in eval mode and restored. A bitsandbytes model on CPU must have had
    disable_cpu_bf16_repack before this call.
    """
    import torch

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [_prompt_ids(tokenizer, p) for p in prompts[i:i + batch_size]]
        T = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (T - len(x)) + x for x in ids], device=device)
        attention_mask = torch.tensor([[0] * (T - len(x)) + [1] * len(x) for x in ids], device=device)
        with torch.no_grad():
            gen = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=pad)
        for row in gen[:, T:].tolist():
            row = row[:row.index(eos)] if eos in row else row
            out.append(tokenizer.decode(row, skip_special_tokens=True).split("\n")[0])
    model.train(was_training)
    return out


def exact_match(model, tokenizer, examples, batch_size=64):
    """Fraction of (prompt, answer) pairs whose greedy continuation is exactly ``answer``
    (generation runs to eos, at most len(tokens(answer)) + 1 new tokens)."""
    examples = list(examples)
    if not examples:
        raise ValueError("exact_match needs at least one (prompt, answer) example")
    max_new = max(len(_answer_ids(tokenizer, a)) for _, a in examples)
    preds = generate_answers(model, tokenizer, [p for p, _ in examples], max_new, batch_size)
    return sum(p == a for p, (_, a) in zip(preds, examples)) / len(examples)


# ----------------------------------------------------------------------------- memory


def held_bytes(model, optimizer=None):
    """Bytes of every tensor that QLoRA training holds, by the components of
    ``budget.qlora_training_memory`` (the same keys): each Linear4bit's packed codes and its
    quant_state (absmax, the double-quant absmax, code, dynamic map, offset), the other
    parameters, the trainable ones and their gradients, and the optimizer's state tensors.
    Each storage is counted once (a tied weight, or bitsandbytes' shared 8-bit maps).
    Buffers (RoPE's inverse frequencies) are not counted, as the budget leaves them out.
    """
    import bitsandbytes as bnb
    import torch

    seen, out = set(), {}

    def add(key, t):
        if t is None or not isinstance(t, torch.Tensor) or t.numel() == 0:
            return
        s = t.untyped_storage()
        if (s.device, s.data_ptr()) not in seen:
            seen.add((s.device, s.data_ptr()))
            out[key] = out.get(key, 0) + s.nbytes()

    for p in model.parameters():
        if isinstance(p, bnb.nn.Params4bit):
            qs = p.quant_state
            add(budget.NF4_CODES, p.data)
            add(budget.NF4_ABSMAX, qs.absmax)
            add(budget.NF4_DQ_ABSMAX, qs.state2.absmax)
            for t in (qs.code, qs.state2.code, qs.offset):
                add(budget.NF4_PER_MATRIX, t)
        elif p.requires_grad:
            add(budget.LORA_FACTORS, p.data)
            add(budget.LORA_GRADS, p.grad)
        else:
            add(budget.UPCAST_REST, p.data)
    for state in ([] if optimizer is None else optimizer.state.values()):
        for key, t in state.items():
            if key in ("state1", "state2", "exp_avg", "exp_avg_sq"):
                add(budget.OPT_8BIT if t.dtype == torch.uint8 else budget.OPT_32BIT, t)
            elif key in ("absmax1", "absmax2"):
                add(budget.OPT_8BIT_ABSMAX, t)
            elif key in ("qmap1", "qmap2"):
                add(budget.OPT_QMAPS, t)
            elif key == "step":
                add(budget.OPT_STEP, t)
            elif isinstance(t, torch.Tensor):
                add(f"optimizer {key}", t)                  # not modelled: shows up as a mismatch
    return out


# ----------------------------------------------------------------------------- the fine-tune


@dataclasses.dataclass
class QLoRAResult:
    """What ``qlora_fine_tune`` returns.

    losses:            the training loss at every step (mean over the answer tokens of the batch)
    exact_match_before, exact_match_after: on the test examples, greedy
    predicted:         budget.qlora_training_memory for this model, r and optimizer (a MemoryEstimate)
    held:              {component: bytes} that the tensors hold after training (held_bytes, on any
                       device: parameters, gradients and every optimizer state tensor, which all
                       exist from the first step on)
    peak_bytes:        torch.cuda.max_memory_allocated over the training steps, on a GPU (loading and
                       evaluation excluded: the stats are reset just before the first step); else None
    measured_bytes:    peak_bytes on a GPU, else the sum of held
    optimizer:         which optimizer ran, and how ("PagedAdamW8bit", "PagedAdamW8bit (unpaged on CPU)", "AdamW")
    model, tokenizer:  the trained PeftModel (model.save_pretrained(dir) writes the adapter) and its tokenizer
    """

    model_name: str
    device: str
    optimizer: str
    losses: list
    exact_match_before: float
    exact_match_after: float
    predicted: budget.MemoryEstimate
    held: dict
    peak_bytes: int | None
    seconds: float
    model: object = dataclasses.field(repr=False)
    tokenizer: object = dataclasses.field(repr=False)

    @property
    def measured_bytes(self):
        return self.peak_bytes if self.peak_bytes is not None else sum(self.held.values())

    def save_adapter(self, directory):
        """Write adapter_config.json and adapter_model.safetensors to ``directory``; returns it as a Path."""
        from pathlib import Path

        with quiet():
            self.model.save_pretrained(directory)
        return Path(directory)


def _optimizer(params, device, lr):
    """PagedAdamW8bit where bitsandbytes has its 8-bit kernels (CUDA, CPU), AdamW elsewhere.
    Weight decay 0, as QLoRA's runs. Returns (optimizer, its name in budget, a description)."""
    import torch

    kind = torch.device(device).type
    if kind in _OPTIMIZER_DEVICES:
        import bitsandbytes as bnb

        how = "PagedAdamW8bit" + (" (unpaged on CPU)" if kind == "cpu" else "")
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=0.0), "PagedAdamW8bit", how
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0), "AdamW", f"AdamW (no 8-bit optimizer on {kind})"


def qlora_fine_tune(name_or_path, device, train_examples, test_examples, steps, *, batch_size=16, lr=2e-4,
                    r=16, alpha=32, max_grad_norm=0.3, gradient_checkpointing=True, compute_dtype=None,
                    eval_batch_size=64, seed=0):
    """QLoRA-fine-tune ``name_or_path`` on ``device`` ("cuda:0", "cpu") and report the run.

    train_examples, test_examples: (prompt, answer) pairs, as ``tiny.task_examples`` gives.
    steps of ``batch_size`` pairs (``tiny.example_batches`` with ``seed``, through this model's
    tokenizer) in the book's one loop, ``tiny.train_steps``, at a constant learning rate ``lr``
    with gradients clipped to ``max_grad_norm`` (QLoRA's 2e-4 and 0.3 for models up to 13B), LoRA of rank ``r`` and scale alpha / r on all linear layers. Exact match on the test
    pairs before and after. Returns a QLoRAResult; its ``predicted`` is the static memory of
    budget.qlora_training_memory and ``held`` the same terms measured (equal on CPU,
    tests/test_hub_qlora.py); on a GPU ``peak_bytes`` adds activations and transients.
    """
    import torch

    from .tiny import example_batches, train_steps

    train_examples, test_examples = list(train_examples), list(test_examples)
    if not train_examples or not test_examples:
        raise ValueError(f"qlora_fine_tune needs train and test examples, got {len(train_examples)} "
                         f"and {len(test_examples)}")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    cuda = torch.device(device).type == "cuda"
    t0 = time.perf_counter()
    with quiet():
        model, tokenizer = load_qlora_model(name_or_path, device, r, alpha, compute_dtype, gradient_checkpointing,
                                            seed)
        before = exact_match(model, tokenizer, test_examples, eval_batch_size)
        made = {}

        def optimizer(model):
            params = [p for p in model.parameters() if p.requires_grad]
            made["opt"], made["name"], made["how"] = _optimizer(params, device, lr)
            return made["opt"]

        batches = example_batches(train_examples, batch_size, seed,
                                  collate=lambda pairs: make_batch(tokenizer, pairs, device))
        if cuda:                            # the peak of training alone: not loading's transient copies
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        run = train_steps(model, batches, steps, optimizer=optimizer, warmup=0, min_lr_frac=1.0,   # constant lr
                          clip_norm=max_grad_norm)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        held = held_bytes(model, made["opt"])
        predicted = budget.qlora_training_memory(model.config.to_dict(), r, "all-linear", optimizer=made["name"])
        after = exact_match(model, tokenizer, test_examples, eval_batch_size)
    return QLoRAResult(str(name_or_path), str(device), made["how"], run["losses"], before, after, predicted, held, peak,
                       time.perf_counter() - t0, model, tokenizer)
