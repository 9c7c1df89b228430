"""The shipped tiny Llama as a standard Hugging Face model directory, with a byte tokenizer.

``export_hf(directory)`` writes what ``AutoModelForCausalLM.from_pretrained(directory)`` and
``AutoTokenizer.from_pretrained(directory)`` read, offline, so that code written for a hub
model (``lora_ref.hub``) runs unchanged on the tiny model:

* ``config.json``, ``generation_config.json``, ``model.safetensors``: ``save_pretrained`` of
  ``load_tiny_llama()`` (fp32, the shipped weights);
* ``tokenizer.json``, ``tokenizer_config.json``: ``byte_tokenizer()``, built in code with the
  ``tokenizers`` library. Its ids are the UTF-8 byte values, exactly ``tiny.encode``.

The command line does the same: ``python -m lora_ref.tiny export DIR``.
"""

from __future__ import annotations

from pathlib import Path

from .model import EOS_ID, PAD_ID, load_tiny_llama

__all__ = ["byte_tokenizer", "export_hf"]


def _byte_to_unicode():
    """GPT-2's reversible map from the 256 byte values to printable characters (the alphabet of
    the ``tokenizers`` ByteLevel normaliser and decoder): bytes that print as themselves keep
    their character, the 68 others (controls, space, ...) go to chr(256 + i) in byte order,
    so "\\x00" -> "Ā" (U+0100) and "\\n" -> "Ċ" (U+010A)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer():
    """A ``transformers`` fast tokenizer whose ids are the UTF-8 bytes of the text.

    Built from a ``tokenizers.Tokenizer``: the ByteLevel normaliser writes each byte as one
    character, a BPE model with the 256 byte characters as its vocabulary (id = byte value)
    and no merges gives one token per byte, and the ByteLevel decoder maps the characters
    back to bytes. So ``tok(text).input_ids == tiny.encode(text).tolist()`` and ``decode``
    inverts it. No BOS or EOS is added (no post-processor), as ``tiny.encode`` adds none.

    Special tokens: pad = byte 0 (NUL, never in the text) and eos = byte 10 (``"\\n"``), the
    tiny model's PAD_ID and EOS_ID. transformers matches special tokens in the raw text, by
    their byte-level spelling, so the two characters U+0100 "Ā" and U+010A "Ċ" (which no task
    string contains; the task is ASCII) would be read as pad and eos.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    chars = _byte_to_unicode()
    tok = Tokenizer(models.BPE(vocab={c: b for b, c in chars.items()}, merges=[]))   # id = byte value
    tok.normalizer = normalizers.ByteLevel()          # text -> one character per UTF-8 byte
    tok.decoder = decoders.ByteLevel()                # characters -> bytes -> text
    special = dict(special=True, normalized=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=AddedToken(chars[PAD_ID], **special),
        eos_token=AddedToken(chars[EOS_ID], **special),
        clean_up_tokenization_spaces=False,            # bytes in, the same bytes out
        model_max_length=256,                          # CONFIG["max_position_embeddings"]
    )


def export_hf(directory, model=None):
    """Write ``model`` (default: the shipped ``load_tiny_llama()``) and ``byte_tokenizer()`` to
    ``directory`` (created if missing) as a Hugging Face model directory; returns its Path.

    Nothing is downloaded: the weights are the shipped safetensors and the tokenizer is built
    in code. ``AutoModelForCausalLM.from_pretrained(directory)`` then gives the same logits as
    ``load_tiny_llama()`` (tests/test_tiny_export.py).
    """
    from transformers.utils import logging

    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"export_hf writes a directory, but {directory} is a file")
    directory.mkdir(parents=True, exist_ok=True)
    model = load_tiny_llama() if model is None else model
    was_disabled = not logging.is_progress_bar_enabled()
    logging.disable_progress_bar()                     # save_pretrained's "Writing model shards" bar
    try:
        model.save_pretrained(directory, safe_serialization=True)
        byte_tokenizer().save_pretrained(directory)
    finally:
        if not was_disabled:
            logging.enable_progress_bar()
    return directory
