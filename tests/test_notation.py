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
    "a scale rule is s = alpha r^e; p is the optimiser's power, nu the first step's exponent":
        re.compile(r"s\s*=\s*\\alpha\s*r\^\{?-\s*p\b|\be_\\text\{(SGD|Adam)\}"),
    "P is a projector; the trainable count is N_LoRA":
        re.compile(r"\$P\s*=\s*n_\\text|\bP\s*=\s*budget\.lora_param_count|the \$P\$ adapter|\\beta P\b|\$2P\$"),
    "q indexes the NF4 levels; the rank of an svd combination is r_svd":
        re.compile(r"rank \$q\b|\$q\$ the `svd_rank`|\\operatorname\{rank\} X \\le q\b|at \$q = \d"),
}

# delta is NF4's outermost quantile; only the QLoRA chapter and the quantisation module speak of it.
DELTA = re.compile(r"\\delta\b|δ")
DELTA_HOMES = ("notebooks/08_qlora.ipynb", "lora_ref/quant.py")


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


def test_delta_means_only_nf4s_outermost_quantile():
    found = [f"{where}: {m.group(0)!r}" for where, text in TEXTS if not where.startswith(DELTA_HOMES)
             for m in DELTA.finditer(text)]
    assert not found, "delta is NF4's quantile (book/notation.md); use Delta W, Delta theta or dA; found:\n" + "\n".join(found)


def test_delta_rule_catches_a_perturbation_named_delta():
    assert DELTA.search(r"a small perturbation $\delta$ raises it") and not DELTA.search(r"$\Delta W$, $\Delta\theta$")


@pytest.mark.parametrize("rule, bad", [
    ("B is LoRA's up-projection, not the block size (b, `blocksize`)", "blocks of $B = 64$ weights"),
    ("h is the hidden size, not the bottleneck z = A x", "h = x @ A.T   # (n, r)"),
    ("s is the scaling, not the singular values (sigma)", "U, s, Vt = np.linalg.svd(W)"),
    ("shapes are (d, k) = (out, in), never (d_in, d_out)", "returns (d_in, d_out)"),
    ("L is the loss; the number of layers is n_layers", 'L = cfg["num_hidden_layers"]'),
    ("G is dL/dW; dL/dY is Ybar", "G = dL/dY: (d, n)"),
    ("a scale rule is s = alpha r^e; p is the optimiser's power, nu the first step's exponent",
     r"Now put in $s = \alpha r^{-p}$ ($p = 1$ for $\alpha/r$)"),
    ("a scale rule is s = alpha r^e; p is the optimiser's power, nu the first step's exponent",
     r"e_\text{SGD} = 1 - 2p + q"),
    ("P is a projector; the trainable count is N_LoRA", r"$P = n_\text{layers} \sum r(d + k)$"),
    ("P is a projector; the trainable count is N_LoRA", 'P = budget.lora_param_count(cfg, 16, "all-linear")'),
    ("q indexes the NF4 levels; the rank of an svd combination is r_svd", "and $q$ the `svd_rank` (by default"),
    ("q indexes the NF4 levels; the rank of an svd combination is r_svd", "from 1.065 nats per byte at $q = 1$"),
])
def test_each_rule_catches_the_misuse_it_names(rule, bad):
    assert MISUSES[rule].search(bad)


def test_notation_page_defines_the_symbols_part_two_needs():
    text = (ROOT / "book" / "notation.md").read_text()
    for symbol in (r"$G$", r"$\eta$", r"$\lambda$", r"\operatorname{erank}", r"$\varphi$", r"$z$", r"$b$", r"$\bar Y$"):
        assert symbol in text, symbol


def test_notation_page_defines_the_symbols_of_chapters_03_to_09():
    text = (ROOT / "book" / "notation.md").read_text()
    rows = {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| $")}
    for symbol in (r"$e$", r"$p$", r"$\nu$", r"$\zeta$", r"$P_A$, $P_B$", r"$N_\text{LoRA}$", r"$m$", r"$w_i$",
                   r"$\omega_i$", r"$\gamma$", r"$r_\text{svd}$", r"$\Delta W_j$", r"$\Delta\theta$"):
        assert symbol in rows, f"{symbol} has no row in book/notation.md"
