"""A static image of every plotly figure in the committed notebooks, for readers without JavaScript.

    python tools/static_figures.py notebooks/*.ipynb      # add or refresh the images in place

A plotly output is a ``<div class="plotly-graph-div">`` that a script fills. GitHub's notebook viewer
strips the script, ``nbconvert --to html`` keeps it but a reader may run no JavaScript, and either way
the figure is an empty box. Here the figure is exported by plotly's own exporter (kaleido, which
drives the chromium of the browser test) as SVG in its default state (the slider where it opens) and
put inside that div as an ``<img>``:

- without JavaScript the div holds the image, at the figure's width and height;
- with JavaScript plotly draws into the same div, marks it ``js-plotly-plot``, and the book's CSS
  (book/_static/lora-book.css) hides the image: the book and Colab keep the interactive figure.

The image sits in the output's HTML, so nbval never compares it: figure cells are tagged
``nbval-ignore-output`` (tests/test_static_figures.py checks both). `make execute` calls this after
executing; each image is SVG, base64 in a data URI, within ``BUDGET_BYTES`` per figure.
"""

import base64
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat

WIDTH = 720                      # px: the text column of a desktop page (finish_layout's layout)
HEIGHT = 520                     # px: finish_layout's default height, where a figure sets none
BUDGET_BYTES = 128_000           # per figure, as stored (base64): 14-101 KB measured over the 39 figures
TOTAL_BUDGET_BYTES = 1_500_000   # all figures of all chapters: 1.25 MB measured
IMG_CLASS = "lora-static-figure"
_NEWPLOT = "Plotly.newPlot("
_IMG = re.compile(r'<img class="' + IMG_CLASS + r'"[^>]*>')
_GRAPH_DIV = re.compile(r'(<div id="([^"]+)" class="plotly-graph-div" style="[^"]*">)(.*?)(</div>)', re.S)


def figure_arguments(html):
    """(data, layout) of the first Plotly.newPlot(id, data, layout, config) call in an output's HTML,
    or None where the HTML draws no plotly figure."""
    start = html.find(_NEWPLOT)
    if start < 0:
        return None
    decoder = json.JSONDecoder()
    args, i = [], start + len(_NEWPLOT)
    for _ in range(3):                              # the div's id, the traces, the layout
        while html[i] in " \t\r\n,":
            i += 1
        value, i = decoder.raw_decode(html, i)
        args.append(value)
    _, data, layout = args
    if not isinstance(data, list) or not isinstance(layout, dict):
        raise ValueError(f"Plotly.newPlot at character {start} has no (data list, layout dict) arguments")
    return data, layout


def with_fallback(html, svg):
    """The output's HTML with ``svg`` (bytes) as an <img> inside the figure's div, replacing an
    image put there before. Raises ValueError if the HTML has no plotly graph div."""
    match = _GRAPH_DIV.search(html)
    if match is None:
        raise ValueError("no <div class=\"plotly-graph-div\"> in this output: not a plotly figure")
    src = "data:image/svg+xml;base64," + base64.b64encode(svg).decode("ascii")
    img = (f'<img class="{IMG_CLASS}" alt="the figure in its default state (an interactive version needs '
           f'JavaScript)" style="display:block;max-width:100%;height:auto" src="{src}">')
    inner = _IMG.sub("", match.group(3))
    return html[:match.start()] + match.group(1) + inner + img + match.group(4) + html[match.end():]


def fallback_svg(html):
    """The SVG bytes of the image inside the figure's div, or None."""
    match = _IMG.search(html)
    if match is None:
        return None
    src = re.search(r'src="data:image/svg\+xml;base64,([^"]+)"', match.group(0))
    return base64.b64decode(src.group(1)) if src else None


def figure_outputs(nb):
    """Every (cell, output) of ``nb`` whose HTML draws a plotly figure."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        for out in cell.get("outputs", []):
            html = out.get("data", {}).get("text/html")
            if html is not None and _NEWPLOT in "".join(html):
                yield cell, out


def _browser():
    """kaleido finds chromium through BROWSER_PATH: the browser test's Debian chromium."""
    if not os.environ.get("BROWSER_PATH"):
        found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
        if found is None:
            raise RuntimeError("static figures need chromium (apt-get install chromium), or BROWSER_PATH set")
        os.environ["BROWSER_PATH"] = found


def add_static_figures(nb):
    """Export every plotly figure of ``nb`` (one kaleido session for all) and put each image in its
    output. Returns the stored size of each image, in bytes, in the order of the figures."""
    import plotly.graph_objects as go
    import plotly.io as pio

    outputs = list(figure_outputs(nb))
    if not outputs:
        return []
    _browser()
    figures = []
    for _, out in outputs:
        data, layout = figure_arguments("".join(out["data"]["text/html"]))
        figures.append(go.Figure(data=data, layout=layout))
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp, f"figure{i}.svg") for i in range(len(figures))]
        pio.write_images(figures, paths, format="svg", width=WIDTH,
                         height=[f.layout.height or HEIGHT for f in figures])
        images = [p.read_bytes() for p in paths]
    sizes = []
    for (_, out), svg in zip(outputs, images):
        out["data"]["text/html"] = with_fallback("".join(out["data"]["text/html"]), svg)
        sizes.append(len(fallback_svg(out["data"]["text/html"])) * 4 // 3)
    over = [f"figure {i + 1}: {s} bytes" for i, s in enumerate(sizes) if s > BUDGET_BYTES]
    if over:
        raise ValueError(f"static images over the {BUDGET_BYTES}-byte budget: {', '.join(over)}")
    return sizes


def main(paths):
    total = 0
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        sizes = add_static_figures(nb)
        if sizes:
            nbformat.write(nb, path)
        total += sum(sizes)
        print(f"{path}: {len(sizes)} figures, {sum(sizes) / 1e3:.0f} KB of images")
    print(f"in all: {total / 1e6:.2f} MB")


if __name__ == "__main__":
    main(sys.argv[1:])
