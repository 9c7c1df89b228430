"""lora_ref.hub.qlora_fine_tune, the chapter's Colab path, run on CPU against the exported tiny model.

The same code fine-tunes Qwen2.5-0.5B on a GPU; here only the model (a directory written by
`python -m lora_ref.tiny export`) and the device differ. Oracles:
  - the loss falls, and the run really is NF4 + double quantisation, prepare_model_for_kbit_training,
    PEFT all-linear and bitsandbytes' 8-bit AdamW (its state is uint8 where bitsandbytes says so);
  - the bytes every tensor holds after one optimizer step = budget.qlora_training_memory, term by term;
  - the adapter written by save_pretrained loads back with PeftModel.from_pretrained, same logits;
  - batches and greedy answers through the HF tokenizer = lora_ref.tiny's own make_batch / generate.
One fine-tune (40 steps) is shared by the tests of this module; the whole module takes seconds.
"""

import math

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
bnb = pytest.importorskip("bitsandbytes")

from lora_ref import budget, hub, quiet, tiny  # noqa: E402
from lora_ref.tiny.export import export_hf  # noqa: E402

pytestmark = pytest.mark.slow          # make unit leaves it out; make test runs it

STEPS, LR, R, ALPHA = 40, 5e-3, 16, 32


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These matmuls are tiny: one thread is as fast, and two OpenMP threads on a shared, loaded
    CPU spin against the other processes (we measured 100x slower steps)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export_hf(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module")
def run(model_dir, one_thread):
    return hub.qlora_fine_tune(model_dir, "cpu", tiny.task_examples("train", 1000, seed=0),
                               tiny.task_examples("test", 64, seed=0), steps=STEPS, lr=LR, r=R, alpha=ALPHA)


def _fresh_4bit_base(model_dir):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    with quiet():
        model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization,
                                                     device_map={"": "cpu"})
    hub.disable_cpu_bf16_repack(model)
    return model


# ----------------------------------------------------------------------------- the run


def test_qlora_fine_tune_on_the_exported_tiny_model_lowers_the_loss(run):
    """From about log(256) = 5.5 nats (the answer bytes are new to the model) to well under half."""
    first, last = run.losses[0], sum(run.losses[-5:]) / 5
    assert len(run.losses) == STEPS and all(math.isfinite(x) for x in run.losses)
    assert first > 4.0 and last < 0.5 * first, (first, last)
    assert run.exact_match_before == 0.0


def test_the_run_is_nf4_double_quant_with_lora_on_every_linear_layer(run):
    from peft import PeftModel

    model = run.model
    assert isinstance(model, PeftModel)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    n_layers = tiny.CONFIG["num_hidden_layers"]
    assert len(layers) == 7 * n_layers                                       # lm_head stays unquantised
    for layer in layers:
        qs = layer.weight.quant_state
        assert qs.quant_type == "nf4" and qs.blocksize == 64 and qs.nested and qs.state2.blocksize == 256
        assert layer.support_avx512bf16_for_cpu is False                    # the bf16 repack trap, switched off
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable) and len(trainable) == 2 * 7 * n_layers
    cfg = model.config.to_dict()
    assert run.predicted.params_trainable == budget.lora_param_count(cfg, R, "all-linear") == \
        sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters()
               if not isinstance(p, bnb.nn.Params4bit))                     # prepare_model_for_kbit_training


def test_the_optimizer_is_bitsandbytes_8bit_adamw_run_unpaged_on_cpu(run):
    """bitsandbytes 0.50 runs PagedAdamW8bit on CPU without paging (it warns and falls back),
    with its 8-bit blockwise kernel for tensors of 4096 entries or more."""
    assert run.optimizer == "PagedAdamW8bit (unpaged on CPU)"
    assert run.held[budget.OPT_8BIT] > 0 and run.held[budget.OPT_32BIT] > 0   # r = 16 puts tensors on both sides
    assert run.peak_bytes is None                                          # on a CPU: the bytes held


def test_memory_formula_equals_bytes_held_after_one_step_term_by_term(run):
    """Every tensor held after one PagedAdamW8bit step (NF4 codes and quant states, the fp32 rest,
    LoRA factors and gradients, 8-bit and 32-bit Adam state, the shared maps) = the formula."""
    assert run.held == dict(run.predicted.breakdown)
    assert run.measured_bytes == run.predicted.total_bytes


def test_memory_formula_with_torch_adamw_equals_bytes_held(model_dir):
    """The fallback optimizer (devices without bitsandbytes' 8-bit kernels): fp32 m, v and a scalar
    step tensor per trainable tensor, on the same prepared NF4 model."""
    with quiet():
        model, tokenizer = hub.load_qlora_model(model_dir, "cpu", r=4, alpha=8, gradient_checkpointing=False)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    model(**hub.make_batch(tokenizer, tiny.task_examples("train", 4))).loss.backward()
    opt.step()
    predicted = budget.qlora_training_memory(model.config.to_dict(), 4, "all-linear", optimizer="AdamW")
    assert hub.held_bytes(model, opt) == dict(predicted.breakdown)


# ----------------------------------------------------------------------------- the adapter


def test_saved_adapter_loads_back_with_peft_and_gives_the_same_logits(run, model_dir, tmp_path):
    import json

    from peft import PeftModel

    path = run.save_adapter(tmp_path / "adapter")
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["r"] == R and config["lora_alpha"] == ALPHA and (path / "adapter_model.safetensors").exists()
    with quiet():
        loaded = PeftModel.from_pretrained(_fresh_4bit_base(model_dir), path).eval()
    batch = tiny.make_batch(tiny.task_examples("test", 8))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    run.model.eval()
    with torch.no_grad(), quiet():
        a, b = run.model(**inputs).logits, loaded(**inputs).logits
    assert torch.equal(a, b)                    # the same NF4 bytes (quantisation is deterministic), same A, B
    with torch.no_grad():
        base = _fresh_4bit_base(model_dir)(**inputs).logits
    assert (a - base).abs().max() > 1.0         # and the adapter is not a no-op


# ----------------------------------------------------------------------------- batches and answers


def test_hub_batches_equal_tiny_make_batch_with_the_byte_tokenizer(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = tiny.task_examples("train", 6) + [("ab -> ", "c"), ("a longer prompt -> ", "an answer")]
    ours, theirs = hub.make_batch(tokenizer, examples), tiny.make_batch(examples)
    for key in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(ours[key], theirs[key]), key


def test_greedy_answers_through_the_tokenizer_equal_tiny_generate(model_dir):
    """transformers' generate with left padding (prompts of different lengths) gives the answers
    that lora_ref.tiny's own KV-cache loop gives on the unquantised model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompts = [p for p, _ in tiny.task_examples("test", 6)] + ["the number after 41 is ", "3 plus 4 is "]
    ours = hub.generate_answers(model, tokenizer, prompts, max_new_tokens=12)
    theirs = tiny.generate(tiny.load_tiny_llama(), prompts, max_new_tokens=12)
    assert ours == theirs
    assert "42." in ours                          # the pretrained model has learnt this much


# ----------------------------------------------------------------------------- which model, which device


def test_should_run_follows_the_gpu_and_the_variable(monkeypatch):
    monkeypatch.delenv(hub.HUB_MODEL_ENV, raising=False)
    assert hub.should_run(gpu_available=True)[:3] == (True, "Qwen/Qwen2.5-0.5B", "cuda:0")
    skip = hub.should_run(gpu_available=False)
    assert not skip.run and skip.model is None and hub.HUB_MODEL_ENV in skip.reason
    assert skip.reason.count(". ") == 0 and skip.reason.endswith(".")       # one sentence
    monkeypatch.setenv(hub.HUB_MODEL_ENV, "/some/dir")
    assert hub.should_run(gpu_available=False)[:3] == (True, "/some/dir", "cpu")
    assert hub.should_run(gpu_available=True)[:3] == (True, "/some/dir", "cuda:0")
    assert hub.hub_model_name() == "/some/dir"
    monkeypatch.setenv(hub.HUB_MODEL_ENV, "  ")
    assert hub.hub_model_name("m") == "m" and not hub.should_run(gpu_available=False).run


def test_qlora_fine_tune_rejects_bad_input_before_loading_anything():
    pairs = tiny.task_examples("train", 2)
    with pytest.raises(ValueError, match="steps must be a positive integer, got steps=0"):
        hub.qlora_fine_tune("unused", "cpu", pairs, pairs, steps=0)
    with pytest.raises(ValueError, match="needs train and test examples, got 2 and 0"):
        hub.qlora_fine_tune("unused", "cpu", pairs, [], steps=1)


# ----------------------------------------------------------------------------- the formula alone

# Qwen2.5-0.5B's public config.json (huggingface.co/Qwen/Qwen2.5-0.5B), the chapter's GPU model
QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True)


def test_prepared_qwen25_keeps_its_tied_embedding_in_fp32():
    """prepare_model_for_kbit_training upcasts the tied 151936 x 896 embedding to fp32: 545 MB, not 272."""
    est = budget.qlora_training_memory(QWEN25_05B, 16)
    rest = budget.base_param_count(QWEN25_05B) - budget.decoder_linear_param_count(QWEN25_05B)
    assert est.breakdown[budget.UPCAST_REST] == 4 * rest
    assert round(4 * 151936 * 896 / 1e6) == 545 and 4 * 151936 * 896 < 4 * rest < 4 * 151936 * 896 + 2e6


def test_nf4_terms_equal_nf4_bits_per_param_when_the_blocks_divide():
    """With every matrix a multiple of 64 x 256 weights, codes + constants + their constants are
    exactly nf4_bits_per_param() = 4.127 bits per weight, and the extras 1,092 B per matrix."""
    cfg = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2)
    b = budget.qlora_training_memory(cfg, 4).breakdown
    n_lin = budget.decoder_linear_param_count(cfg)
    nf4 = b[budget.NF4_CODES] + b[budget.NF4_ABSMAX] + b[budget.NF4_DQ_ABSMAX]
    assert nf4 == n_lin * budget.nf4_bits_per_param() / 8
    assert b[budget.NF4_PER_MATRIX] == 1092 * 7 * 2


def test_small_adapter_tensors_keep_32bit_adam_state():
    """bitsandbytes keeps m, v in fp32 for tensors under min_8bit_size = 4096 entries: at r = 8 every
    tiny-model LoRA tensor is under it (largest 344 x 8 = 2752), so the 8-bit terms vanish."""
    cfg = dict(tiny.CONFIG, model_type="llama")
    small = budget.qlora_training_memory(cfg, 8).breakdown
    p = budget.lora_param_count(cfg, 8, "all-linear")
    assert small[budget.OPT_8BIT] == small[budget.OPT_QMAPS] == small[budget.OPT_8BIT_ABSMAX] == 0
    assert small[budget.OPT_32BIT] == 8 * p
    everything_8bit = budget.qlora_training_memory(cfg, 8, min_8bit_size=1).breakdown
    assert everything_8bit[budget.OPT_8BIT] == 2 * p and everything_8bit[budget.OPT_QMAPS] == 2048
    with pytest.raises(ValueError, match="optimizer must be one of"):
        budget.qlora_training_memory(cfg, 8, optimizer="Adafactor")
