"""book/notation.md is true: a letter it reserves is not used with another meaning.

Each rule is a pattern for a misuse that was once in the book, searched in the chapters
(prose and code), the prose pages and the library's source (docstrings and comments).
"""

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

MISUSES = {
    "B is LoRA's up-projection, not the block size (b, `blocksize`)":
        re.compile(r"\bB\s*=\s*[1-9]|blocks? of \$B|\$B\$[- ]blocks?|block size \$B\b|\bB\s*=\s*(64|blocksize)"),
    "h is the hidden size, not the bottleneck z = A x":
        re.compile(r"\bh\s*=\s*A\s*x|\bh\s*=\s*Ax\b|\bh\s*=\s*x2?\s*@\s*A\.T|h\s*=\s*self\.lora_dropout"),
    "s is the scaling, not the singular values (sigma)":
        re.compile(r"\b[UuV]\w*,\s*s,\s*\w+\s*=|\bs\s*=\s*(np\.linalg\.|torch\.linalg\.)?(svd|svdvals)\(|\bs\s*=\s*singular_values\("),
    "shapes are (d, k) = (out, in), never (d_in, d_out)":
        re.compile(r"\(\s*d_in\s*,\s*d_out\s*\)"),
    "L is the loss; the number of layers is n_layers":
        re.compile(r"\bL\b\s*=\s*[^\n]{0,30}num_hidden_layers|\bL\s*=\s*n_layers"),
    "G is dL/dW; dL/dY is Ybar":
        re.compile(r"\bG\s*=\s*(dL/dY|\\partial L\s*/\s*\\partial Y|∂L/∂Y)"),
}


def _texts():
    """(where, text) for every chapter cell, prose page and library source file."""
    for path in sorted(ROOT.glob("notebooks/*.ipynb")) + sorted(ROOT.glob("book/*.ipynb")):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            yield f"{path.relative_to(ROOT)} cell {i}", "".join(cell["source"])
    for path in sorted(ROOT.glob("book/*.md")) + sorted(ROOT.glob("lora_ref/**/*.py")):
        if path.name != "notation.md":
            yield str(path.relative_to(ROOT)), path.read_text()


TEXTS = list(_texts())


@pytest.mark.parametrize("rule", MISUSES)
def test_reserved_letter_keeps_its_meaning(rule):
    pattern = MISUSES[rule]
    found = [f"{where}: {m.group(0)!r}" for where, text in TEXTS for m in pattern.finditer(text)]
    assert not found, f"{rule}; found:\n" + "\n".join(found)


@pytest.mark.parametrize("rule, bad", [
    ("B is LoRA's up-projection, not the block size (b, `blocksize`)", "blocks of $B = 64$ weights"),
    ("h is the hidden size, not the bottleneck z = A x", "h = x @ A.T   # (n, r)"),
    ("s is the scaling, not the singular values (sigma)", "U, s, Vt = np.linalg.svd(W)"),
    ("shapes are (d, k) = (out, in), never (d_in, d_out)", "returns (d_in, d_out)"),
    ("L is the loss; the number of layers is n_layers", 'L = cfg["num_hidden_layers"]'),
    ("G is dL/dW; dL/dY is Ybar", "G = dL/dY: (d, n)"),
])
def test_each_rule_catches_the_misuse_it_names(rule, bad):
    assert MISUSES[rule].search(bad)


def test_notation_page_defines_the_symbols_part_two_needs():
    text = (ROOT / "book" / "notation.md").read_text()
    for symbol in (r"$G$", r"$\eta$", r"$\lambda$", r"\operatorname{erank}", r"$\varphi$", r"$z$", r"$b$", r"$\bar Y$"):
        assert symbol in text, symbol
