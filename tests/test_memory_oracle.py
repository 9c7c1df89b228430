"""lora_ref.budget against the bytes that real tensors hold after one optimizer step.

budget.py predicts training memory from a config alone. Here the oracle is independent of it:
we build the model in code (transformers' LlamaForCausalLM, nothing downloaded), set it up the
way each method trains, take one AdamW step, and add up the bytes of every tensor that training
keeps alive: the parameters, the gradients of the trainable ones, and the optimizer state.
Each storage is counted once (tied weights share one).

Two things the per-parameter budgets (lora_memory, qlora_memory) leave out on purpose, and which
we account for explicitly (budget.qlora_training_memory, tested in tests/test_hub_qlora.py, models
both):
  - AdamW's ``step`` counter: one fp32 scalar tensor (4 bytes) per trainable TENSOR, not per
    parameter. The budget counts bytes per parameter, so we add 4 T for T trainable tensors.
  - bitsandbytes' per-matrix constants with double quantisation (see the QLoRA test).
Activations are freed after backward and are excluded by the budget: nothing here holds them.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lora_ref import budget  # noqa: E402

# Every decoder weight is a multiple of 64 * 256 = 16384 entries, so NF4 blocks (64) and the
# blocks of double quantisation (256 constants) divide evenly and the QLoRA formula is exact:
# q, o 256 x 256 = 65536; k, v 128 x 256 = 32768 (2 KV heads of 64: GQA); gate, up, down 256 x 512.
CONFIG = dict(
    vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
)
R = 4
STEP_BYTES = 4            # AdamW's state["step"]: a float32 scalar tensor per trainable tensor
NF4_CODE_BYTES = 16 * 4   # quant_state.code: the 16 NF4 levels, fp32, one copy per matrix
DQ_CODE_BYTES = 256 * 4   # quant_state.state2.code: the 8-bit dynamic map, fp32, one copy per matrix
DQ_OFFSET_BYTES = 4       # quant_state.offset: the fp32 mean subtracted from the constants


def _model(dtype, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**CONFIG, **overrides}))
    return model.to(dtype).train()


def _config(model):
    """The model's own config as budget reads it (a config.json dict)."""
    return model.config.to_dict()


def _backward(model):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG["vocab_size"], (2, 16), generator=g)
    model(input_ids=ids, labels=ids).loss.backward()


def _held(tensors):
    """Bytes held by the storages under ``tensors``, each storage counted once."""
    storages = {}
    for t in tensors:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def _adam_state(opt, key):
    return [state[key] for state in opt.state.values()]


def _unique_params(model):
    return list(model.parameters())          # nn.Module.parameters() yields a tied weight once


def _peft_lora(model, target_modules):
    from peft import LoraConfig, get_peft_model

    targets = list(budget.resolve_targets(target_modules))
    return get_peft_model(model, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.0, target_modules=targets))


@pytest.mark.parametrize("tied", [False, True])
def test_base_param_count_equals_the_built_models_parameters(tied):
    """budget's count from the config alone = the numel of the model transformers builds from it,
    with a tied lm_head counted once and the RMSNorm weights (2 per layer + 1 final) included."""
    model = _model(torch.float32, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
    cfg = _config(model)
    assert sum(p.numel() for p in _unique_params(model)) == budget.base_param_count(cfg)
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in budget.LINEAR_MODULES)
    assert linear == budget.decoder_linear_param_count(cfg)


def test_full_finetune_memory_equals_bytes_of_explicit_mixed_precision_adam():
    """Layout checked: the budget's mixed precision, built by hand. bf16 model (weights 2) with
    bf16 gradients (2) kept after backward; an fp32 master copy (4) that AdamW updates, with
    m and v (4 + 4). The fp32 copy of each gradient fed to AdamW is transient (freed after the
    step), as in ZeRO's 2 + 2 + 12 accounting. Every component must match, byte for byte."""
    model = _model(torch.bfloat16)
    params = _unique_params(model)
    master = [p.detach().float().requires_grad_(True) for p in params]     # fp32 master weights
    opt = torch.optim.AdamW(master, lr=1e-3)
    _backward(model)
    for p, w in zip(params, master):
        w.grad = p.grad.float()                                             # transient fp32 gradient
    opt.step()
    for p, w in zip(params, master):
        w.grad = None
        with torch.no_grad():
            p.copy_(w)                                                      # bf16 weights <- master

    est = budget.full_finetune_memory(_config(model))
    n = est.params_total
    assert all(p.dtype == torch.bfloat16 and p.grad.dtype == torch.bfloat16 for p in params)
    measured = {
        "weights (bf16)": _held(params),
        "gradients (bf16)": _held(p.grad for p in params),
        "fp32 master weights": _held(master),
        "Adam m (fp32)": _held(_adam_state(opt, "exp_avg")),
        "Adam v (fp32)": _held(_adam_state(opt, "exp_avg_sq")),
    }
    assert measured == dict(est.breakdown)
    assert sum(measured.values()) == est.total_bytes == 16 * n
    # the step counters are per tensor, outside the per-parameter budget
    assert _held(_adam_state(opt, "step")) == STEP_BYTES * len(params)


def test_full_finetune_memory_equals_bytes_of_plain_fp32_adamw():
    """Layout checked: what plain PyTorch does, fp32 weights (4), fp32 gradients (4), m and v (8).
    A different split of the same 16 bytes/param, so only the total matches the budget."""
    model = _model(torch.float32)
    params = _unique_params(model)
    opt = torch.optim.AdamW(params, lr=1e-3)
    _backward(model)
    opt.step()
    est = budget.full_finetune_memory(_config(model))
    measured = (_held(params) + _held(p.grad for p in params)
                + _held(_adam_state(opt, "exp_avg")) + _held(_adam_state(opt, "exp_avg_sq")))
    assert measured == est.total_bytes
    assert _held(_adam_state(opt, "step")) == STEP_BYTES * len(params)


@pytest.mark.parametrize("target_modules", ["qv", "all-linear"])
def test_lora_memory_equals_bytes_of_peft_lora_after_one_adamw_step(target_modules):
    """LoRA as PEFT keeps it: the base frozen in bf16 (2 bytes/param, no gradient, no state), the
    adapter in fp32 (PEFT's autocast_adapter_dtype) with fp32 gradients and AdamW's m, v:
    4 + 4 + 8 = 16 bytes per LoRA parameter. The budget splits those 16 as mixed precision
    (2 + 2 + 4 master + 8), so the frozen base and Adam's m, v match by component, and the
    adapter's weights + gradients (8) match the budget's weights + gradients + master (8)."""
    model = _model(torch.bfloat16)
    cfg = _config(model)
    peft_model = _peft_lora(model, target_modules)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    frozen = [p for p in peft_model.parameters() if not p.requires_grad]
    assert all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    _backward(peft_model)
    opt.step()
    assert all(p.grad is None for p in frozen)

    est = budget.lora_memory(cfg, R, target_modules)
    b = est.breakdown
    assert sum(p.numel() for p in trainable) == est.params_trainable
    assert _held(frozen) == b["frozen base weights (bf16)"]
    assert _held(_adam_state(opt, "exp_avg")) == b["LoRA Adam m (fp32)"]
    assert _held(_adam_state(opt, "exp_avg_sq")) == b["LoRA Adam v (fp32)"]
    assert _held(trainable) + _held(p.grad for p in trainable) == (
        b["LoRA weights (bf16)"] + b["LoRA gradients (bf16)"] + b["LoRA fp32 master weights"])
    measured = (_held(frozen) + _held(trainable) + _held(p.grad for p in trainable)
                + _held(_adam_state(opt, "exp_avg")) + _held(_adam_state(opt, "exp_avg_sq")))
    assert measured == est.total_bytes
    assert _held(_adam_state(opt, "step")) == STEP_BYTES * len(trainable)


def _quantize_decoder_nf4(model):
    """Replace every decoder linear layer by a bitsandbytes Linear4bit: NF4, blocksize 64, double
    quantisation (compress_statistics=True), as BitsAndBytesConfig(load_in_4bit=True,
    bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True) loads it (lora_ref.oracles)."""
    pytest.importorskip("bitsandbytes")
    from lora_ref import oracles

    for _name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not (isinstance(child, torch.nn.Linear) and child_name in budget.LINEAR_MODULES):
                continue
            setattr(module, child_name, oracles.bnb_linear4bit(child, double_quant=True, compute_dtype=torch.bfloat16))
    model.is_loaded_in_4bit = True                         # PEFT then wraps Linear4bit in its bnb LoRA layer
    return model


def _nf4_matrices(model):
    import bitsandbytes as bnb

    return [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def _nf4_bytes(weights):
    """(bytes of the codes and constants the QLoRA formula counts, bytes of the per-matrix extras)."""
    counted, extras = [], []
    for w in weights:
        qs = w.quant_state
        assert qs.nested and qs.blocksize == 64 and qs.state2.blocksize == 256 and qs.absmax.dtype == torch.uint8
        counted += [w.data, qs.absmax, qs.state2.absmax]   # 4-bit codes, 8-bit constants, fp32 constants of those
        extras += [qs.code, qs.state2.code, qs.offset]     # NF4 levels, dynamic map, mean of the constants
    return _held(counted), _held(extras)


def test_nf4_storage_equals_the_double_quant_formula_plus_per_matrix_constants():
    """Per matrix of n weights, bitsandbytes holds n/2 bytes of codes (4 bits), n/64 uint8
    constants (8 bits per 64 weights) and n/(64*256) fp32 constants of those (32 bits per 64*256):
    exactly nf4_bits_per_param() = 4 + 8/64 + 32/(64*256) bits per weight. On top, per matrix and
    independent of n, it keeps 1,092 bytes the formula leaves out: its own copies of the NF4 codebook
    (16 fp32 = 64 B) and of the 8-bit dynamic map (256 fp32 = 1,024 B), and the fp32 offset (4 B)."""
    model = _quantize_decoder_nf4(_model(torch.bfloat16))
    cfg = _config(model)
    weights = _nf4_matrices(model)
    n_lin = budget.decoder_linear_param_count(cfg)
    assert len(weights) == 7 * cfg["num_hidden_layers"]
    assert sum(w.quant_state.shape.numel() for w in weights) == n_lin
    assert all(w.quant_state.shape.numel() % (64 * 256) == 0 for w in weights)
    counted, extras = _nf4_bytes(weights)
    assert counted == n_lin * budget.nf4_bits_per_param(64, double_quant=True) / 8
    per_matrix = NF4_CODE_BYTES + DQ_CODE_BYTES + DQ_OFFSET_BYTES
    assert per_matrix == 1092
    assert extras == per_matrix * len(weights)


@pytest.mark.parametrize("target_modules", ["qv", "all-linear"])
def test_qlora_memory_equals_bytes_of_peft_on_bitsandbytes_nf4_after_one_adamw_step(target_modules):
    """QLoRA: decoder linears in NF4 with double quantisation, embeddings / norms / lm_head frozen
    in bf16, PEFT's fp32 adapter under AdamW (16 bytes/param, as in the LoRA test). Measured =
    qlora_memory + 1,092 bytes per NF4 matrix (the constants the formula leaves out)."""
    import bitsandbytes as bnb

    model = _quantize_decoder_nf4(_model(torch.bfloat16))
    cfg = _config(model)
    peft_model = _peft_lora(model, target_modules)
    weights = _nf4_matrices(peft_model)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    frozen_16bit = [p for p in peft_model.parameters()
                    if not p.requires_grad and not isinstance(p, bnb.nn.Params4bit)]
    assert all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in frozen_16bit)
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    _backward(peft_model)
    opt.step()

    est = budget.qlora_memory(cfg, R, target_modules, double_quant=True)
    counted, extras = _nf4_bytes(weights)
    bits = budget.nf4_bits_per_param(double_quant=True)
    b = est.breakdown
    assert counted == b[f"frozen linear weights (NF4, {bits:.4g} bits)"]
    assert _held(frozen_16bit) == b["frozen embeddings, lm_head, norms, biases (bf16)"]
    adapter = (_held(trainable) + _held(p.grad for p in trainable)
               + _held(_adam_state(opt, "exp_avg")) + _held(_adam_state(opt, "exp_avg_sq")))
    assert adapter == 16 * est.params_trainable
    measured = counted + extras + _held(frozen_16bit) + adapter
    assert measured == est.total_bytes + 1092 * len(weights)
    assert _held(_adam_state(opt, "step")) == STEP_BYTES * len(trainable)


def test_prepare_model_for_kbit_training_upcasts_the_16bit_rest_to_fp32():
    """What budget.qlora_memory does NOT model (budget.qlora_training_memory does): PEFT's prepare_model_for_kbit_training (used before QLoRA
    training) casts every bf16/fp16 parameter that is not NF4 (embeddings, norms, lm_head) to fp32,
    so that part of the frozen base costs 4 bytes/param, not the 2 that qlora_memory assumes."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training

    model = _quantize_decoder_nf4(_model(torch.bfloat16))
    cfg = _config(model)
    prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    rest = [p for p in model.parameters() if not isinstance(p, bnb.nn.Params4bit)]
    n_rest = budget.base_param_count(cfg) - budget.decoder_linear_param_count(cfg)
    assert sum(p.numel() for p in rest) == n_rest
    assert all(p.dtype == torch.float32 for p in rest)
    assert _held(rest) == 4 * n_rest == 2 * budget.qlora_memory(cfg, R, "qv").breakdown[
        "frozen embeddings, lm_head, norms, biases (bf16)"]
