"""Every plotly figure of the committed notebooks carries a static image of itself (tools/static_figures.py),
for viewers that run no JavaScript: the image is the figure's own (its title is in it), within the size
budget, and in a cell that nbval never compares. The browser test checks what a reader sees."""

import base64
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import static_figures  # noqa: E402

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
SVG = "{http://www.w3.org/2000/svg}"


def _visible_words(text, n):
    text = re.sub(r"<br\s*/?>", " ", text)
    text = re.sub(r"<[^>]+>", "", text)
    return " ".join(text.split()[:n])


def _figures():
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        for i, (cell, out) in enumerate(static_figures.figure_outputs(nb)):
            yield pytest.param(cell, "".join(out["data"]["text/html"]), id=f"{path.stem}-{i + 1}")


FIGURES = list(_figures())


def test_the_chapters_have_figures():
    assert len(FIGURES) >= 30


@pytest.mark.parametrize("cell, html", FIGURES)
def test_each_figure_carries_an_image_of_itself_that_nbval_never_compares(cell, html):
    svg = static_figures.fallback_svg(html)
    assert svg is not None, "no static image: run python tools/static_figures.py on this notebook"
    assert len(base64.b64encode(svg)) <= static_figures.BUDGET_BYTES
    root = ET.fromstring(svg)
    assert root.tag == SVG + "svg" and float(root.get("width")) == static_figures.WIDTH
    _, layout = static_figures.figure_arguments(html)
    title = (layout.get("title") or {}).get("text", "")
    assert title, "every figure of the book has a title (finish_layout's first line)"
    drawn = " ".join("".join(t.itertext()) for t in root.iter(SVG + "text"))
    assert _visible_words(title, 3) in " ".join(drawn.split()), (title, drawn[:300])   # not a stale image
    assert "nbval-ignore-output" in cell.metadata.get("tags", []) or "nbval-skip" in cell.metadata.get("tags", [])


def test_all_images_together_stay_within_the_budget():
    total = sum(len(base64.b64encode(static_figures.fallback_svg(p.values[1]) or b"")) for p in FIGURES)
    assert 0 < total <= static_figures.TOTAL_BUDGET_BYTES, total


def test_the_fallback_goes_inside_the_figures_div_and_replaces_an_older_one():
    go = pytest.importorskip("plotly.graph_objects")
    fig = go.Figure(go.Scatter(x=[1, 2, 3], y=[4, 1, 2], name="a"), layout=dict(title=dict(text="t"), height=300))
    html = fig.to_html(full_html=False, include_plotlyjs=False)
    data, layout = static_figures.figure_arguments(html)
    assert data[0]["y"] == [4, 1, 2] and layout["height"] == 300 and layout["title"]["text"] == "t"
    once = static_figures.with_fallback(html, b"<svg/>")
    twice = static_figures.with_fallback(once, b"<svg>2</svg>")
    assert twice.count(static_figures.IMG_CLASS) == 1 and static_figures.fallback_svg(twice) == b"<svg>2</svg>"
    div = re.search(r'<div id="[^"]+" class="plotly-graph-div"[^>]*>(.*?)</div>', twice, re.S).group(1)
    assert static_figures.IMG_CLASS in div                       # inside: plotly's CSS hook hides it there
    assert static_figures.figure_arguments(twice)[0] == data     # the figure itself untouched
    assert static_figures.figure_arguments("<p>no figure</p>") is None
    with pytest.raises(ValueError, match="plotly-graph-div"):
        static_figures.with_fallback("<p>no figure</p>", b"<svg/>")
