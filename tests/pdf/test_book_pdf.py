"""The PDF edition (`make pdf`, tools/build_pdf.py), opened with pypdf: every chapter is in it, in
order, its formulas are typeset (no TeX source left in the text), its figures are drawn, and the
solutions are left out as the preface says. Run by `make pdf` after the build, not by `make test`."""

import re
import sys
import unicodedata
from pathlib import Path

import nbformat
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PDF = ROOT / "_build" / "pdf" / "book.pdf"
TEX = re.compile(r"\\(frac|sqrt|mathbb|mathrm|begin\{|end\{|left|right|alpha|sigma|\(|\[)|\$\$|\$[A-Za-z\\]")


def _documents():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]


def _title(doc):
    """The document's first heading, as the reader sees it (MyST markup and math dropped)."""
    path = ROOT / f"{doc}.ipynb"
    if path.exists():
        text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    else:
        text = (ROOT / f"{doc}.md").read_text()
    title = next(line[2:] for line in text.splitlines() if line.startswith("# "))
    title = re.sub(r"\$[^$]*\$", " ", title)                       # math: typeset, not in the text layer
    return " ".join(re.sub(r"[`*]", "", title).split())


def _norm(text):
    return " ".join(unicodedata.normalize("NFKC", text).replace("\u2019", "'").split())


@pytest.fixture(scope="module")
def pages():
    if not PDF.exists():
        pytest.fail(f"no {PDF.relative_to(ROOT)}: run 'make pdf'")
    from pypdf import PdfReader

    return [_norm(p.extract_text() or "") for p in PdfReader(PDF).pages]


def test_the_pdf_has_every_document_in_the_books_order(pages):
    assert len(pages) >= 150, len(pages)
    text = " ".join(pages)
    at = 0
    for doc in _documents():
        words = _title(doc).split()[:5]
        found = re.search(r"\s*".join(re.escape(w) for w in words), text[at:])
        assert found, f"{doc}: no {' '.join(words)!r} after character {at}"
        at += found.end()


def test_the_formulas_are_typeset(pages):
    raw = [(i + 1, m.group(0)) for i, p in enumerate(pages) for m in TEX.finditer(p)]
    assert raw == [], f"TeX source in the text layer (page, text): {raw[:10]}"


def test_figures_are_drawn_and_solutions_left_out(pages):
    """plotly draws SVG, whose text (titles, axis labels) is in the PDF's text layer: each figure's
    title is there, and no static image's alt text (those give way to the drawn figures)."""
    sys.path.insert(0, str(ROOT / "tools"))
    import static_figures

    text = " ".join(pages)
    assert "an interactive version needs JavaScript" not in text
    flat = "".join(text.split())
    missing = []
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for _, out in static_figures.figure_outputs(nbformat.read(path, as_version=4)):
            _, layout = static_figures.figure_arguments("".join(out["data"]["text/html"]))
            title = re.sub(r"<[^>]+>", " ", (layout.get("title") or {}).get("text", ""))
            head = "".join(_norm(title).split()[:4])          # the first words, compared without spaces
            if head and head not in flat:
                missing.append(f"{path.stem}: {title[:60]}")
    assert missing == [], missing
    assert "Solution to" not in text and text.count("Exercise") >= 20


def test_each_chapter_starts_a_page(pages):
    for doc in _documents()[1:]:
        words = " ".join(_title(doc).split()[:4])
        assert any(p[:120].find(words) >= 0 for p in pages), f"{doc} starts no page"
