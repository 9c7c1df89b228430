"""The tiny byte-level Llama: its architecture, its byte tokenizer, build and load.

Tokens are bytes: ``encode(text)`` is the UTF-8 bytes of ``text`` as a LongTensor, so the
vocabulary is 256 and there is no tokenizer file. Byte 0 (NUL, never in the text) pads a
batch; a newline ``"\\n"`` ends every sentence and every answer (it is the EOS token).

``load_tiny_llama()`` is ``transformers.LlamaForCausalLM`` built from the shipped
``lora_ref/data/tiny_llama/config.json`` with the weights of ``model.safetensors`` (made by
``tools/make_tiny_model.py``, pretrained on ``lora_ref.tiny.data.corpus()``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

__all__ = ["MODEL_DIR", "CONFIG", "PAD_ID", "EOS", "EOS_ID", "encode", "decode", "build_tiny_llama",
           "load_tiny_llama"]

MODEL_DIR = Path(__file__).resolve().parents[1] / "data" / "tiny_llama"

PAD_ID = 0                    # NUL: never in the text; padded positions get no loss and no attention
EOS = "\n"                    # ends every sentence and every answer
EOS_ID = ord(EOS)

# The architecture of the shipped model (tools/make_tiny_model.py writes it to config.json).
CONFIG = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,       # head_dim 32
    num_key_value_heads=2,       # grouped-query attention: k_proj, v_proj are 128 -> 64
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    attention_dropout=0.0,
    pad_token_id=PAD_ID,
    bos_token_id=None,
    eos_token_id=EOS_ID,
)


# --------------------------------------------------------------------------- bytes


def encode(text: str) -> torch.Tensor:
    """The UTF-8 bytes of ``text`` as a 1-D LongTensor (values 0..255)."""
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    """Inverse of ``encode``: a sequence of byte values (tensor or list) back to text.

    Invalid UTF-8 (a model can emit any byte sequence) becomes U+FFFD instead of an error.
    """
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


# --------------------------------------------------------------------------- the model


def build_tiny_llama(seed: int = 0, **overrides):
    """A freshly initialised (untrained) ``LlamaForCausalLM`` with the shipped architecture."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**{**CONFIG, **overrides}))


def load_tiny_llama(path=None, dtype=torch.float32):
    """The shipped pretrained tiny Llama, in eval mode.

    Built from ``config.json`` with ``LlamaForCausalLM(config)``; the weights come from
    ``model.safetensors`` through ``safetensors.torch.load_file`` (no pickle, no hub) and are
    loaded with ``strict=True``.
    """
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path) if path is not None else MODEL_DIR
    config = LlamaConfig.from_dict(json.loads((path / "config.json").read_text()))
    model = LlamaForCausalLM(config)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    return model.to(dtype).eval()
