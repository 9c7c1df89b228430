"""`python -m lora_ref.tiny export DIR`: the tiny model as a Hugging Face model directory.

The oracles are the shipped model and byte codec: AutoModelForCausalLM.from_pretrained(DIR)
must give load_tiny_llama()'s logits, and AutoTokenizer.from_pretrained(DIR) must encode as
tiny.encode (ids = UTF-8 bytes) and decode back. Everything is written to tmp_path; nothing
is downloaded.
"""

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from lora_ref import tiny  # noqa: E402
from lora_ref.tiny import export  # noqa: E402
from lora_ref.tiny.__main__ import main  # noqa: E402

pytestmark = pytest.mark.slow          # make unit leaves it out; make test runs it


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from transformers.utils import logging

    logging.set_verbosity_error()
    return export.export_hf(tmp_path_factory.mktemp("tiny_hf"))


@pytest.fixture(scope="module")
def tokenizer(exported):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(exported)


def _task_strings():
    pairs = tiny.task_examples("train", 300, seed=0) + tiny.task_examples("test", 300, seed=0)
    return [s for p, a in pairs for s in (p, a, p + a + tiny.EOS)]


def test_exported_model_gives_the_same_logits_as_load_tiny_llama(exported):
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(exported).eval()
    ours = tiny.load_tiny_llama()
    batch = tiny.make_batch(tiny.task_examples("test", 8))
    with torch.no_grad():
        a = ours(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = theirs(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert type(theirs).__name__ == "LlamaForCausalLM" and theirs.dtype == torch.float32
    assert torch.equal(a, b)                            # the same fp32 weights, the same graph


def test_exported_directory_holds_safetensors_and_no_pickle(exported):
    names = {p.name for p in exported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)


def test_exported_tokenizer_encodes_the_task_strings_as_tiny_encode(tokenizer):
    for s in _task_strings():
        assert tokenizer(s)["input_ids"] == tiny.encode(s).tolist(), s


def test_exported_tokenizer_decodes_the_task_strings_back(tokenizer):
    for s in _task_strings():
        assert tokenizer.decode(tiny.encode(s).tolist()) == s, s


def test_exported_tokenizer_round_trips_every_byte_value(tokenizer):
    """The vocabulary is GPT-2's byte alphabet (the one the ByteLevel normaliser and decoder use)
    with id = byte value, for all 256 bytes; and a text whose UTF-8 form holds every byte that
    valid UTF-8 can hold in these code points (U+0000..U+00FF give 0x00..0x7F and C2/C3 xx,
    the arrow and the emoji add three- and four-byte forms) encodes to its bytes and decodes back,
    the pad and eos bytes included."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    assert tokenizer.get_vocab() == {c: b for b, c in bytes_to_unicode().items()} and len(tokenizer) == 256
    text = "".join(chr(i) for i in range(256)) + "é→😀"
    ids = tokenizer(text)["input_ids"]
    assert ids == list(text.encode("utf-8")) == tiny.encode(text).tolist()
    assert tokenizer.decode(ids) == text


def test_exported_tokenizer_pads_with_byte_0_ends_with_newline_and_adds_no_bos(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (tiny.PAD_ID, tiny.EOS_ID) == (0, 10)
    assert tokenizer.bos_token_id is None
    assert tokenizer("ab")["input_ids"] == [97, 98]                 # nothing added at either end
    batch = tokenizer(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0] == [97, 98, 0, 0] and batch["attention_mask"][0] == [1, 1, 0, 0]


def test_the_byte_level_spellings_of_pad_and_eos_are_read_as_those_tokens(tokenizer):
    """The limit byte_tokenizer documents: transformers matches special tokens in the raw text by
    their byte-level spelling, so U+0100 and U+010A encode as 0 and 10, not as their two UTF-8
    bytes. No task string contains them (the task is ASCII)."""
    assert tokenizer("\u0100\u010a")["input_ids"] == [0, 10]
    assert list("\u0100\u010a".encode()) == [196, 128, 196, 138]
    assert all(s.isascii() for s in _task_strings())


def test_command_line_export_writes_a_directory_that_loads(tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "lora_ref.tiny", "export", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"to {out}" in done.stdout
    assert AutoTokenizer.from_pretrained(out)("2023-04-05")["input_ids"] == list(b"2023-04-05")
    assert (out / "model.safetensors").stat().st_size > 0


def test_export_refuses_a_path_that_is_a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("")
    with pytest.raises(NotADirectoryError, match="is a file"):
        export.export_hf(f)
    with pytest.raises(SystemExit):
        main(["export"])                                              # the directory is required
