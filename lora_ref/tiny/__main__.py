"""``python -m lora_ref.tiny export DIR``: write the tiny model and its byte tokenizer to DIR.

DIR then loads offline with ``AutoModelForCausalLM.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)``, for example as ``LORA_BOOK_HUB_MODEL=DIR`` in the
QLoRA chapter (see ``lora_ref.hub``).
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lora_ref.tiny",
                                     description="Tools for the book's tiny byte-level Llama.")
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write the model and tokenizer as a Hugging Face model directory")
    export.add_argument("directory", help="where to write config.json, model.safetensors, tokenizer.json, ...")
    args = parser.parse_args(argv)

    from .export import export_hf

    path = export_hf(args.directory)
    print(f"wrote the tiny model and its byte tokenizer to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
