"""The PDF edition: the whole book as one page (Sphinx's singlehtml builder), printed by chromium.

    python tools/build_pdf.py            # writes _build/pdf/book.pdf (make pdf)

Why this route: it works offline on a fresh machine with what the browser test already installs
(Debian's chromium, Playwright), and the PDF shows what the site shows: MathJax 3's equations with
their numbers, the proofs and exercises of sphinx-proof and sphinx-exercise, the bibliography, and
each plotly figure drawn by plotly.js in its default state. Jupyter Book's LaTeX builder would need a
TeX installation (about 2 GB with the fonts and packages it asks for), and plotly figures do not reach
LaTeX at all.

The page is built from the committed outputs (no chapter is executed, as in ``make book-committed``),
served on 127.0.0.1 and printed once MathJax has typeset and every figure has drawn. The print rules
of book/_static/lora-book.css start each document on a new page and leave out the solutions (the
preface says so); the theme's own print rules drop the navigation. Sphinx's table of contents opens
the page, and chromium writes the headings as the PDF's outline. A copy goes to _build/html/book.pdf,
where the front page links to it.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SINGLE = ROOT / "_build" / "singlehtml"
OUT = ROOT / "_build" / "pdf" / "book.pdf"
CHROMIUM = os.environ.get("BROWSER_PATH") or "/usr/bin/chromium"
MARGIN_MM = {"top": 16, "bottom": 18, "left": 14, "right": 14}
# The A4 text column at 96 px per inch (210 mm less the margins): the page is laid out, and plotly draws
# each figure, at the width it prints, under the print rules.
VIEWPORT_PX = round((210 - MARGIN_MM["left"] - MARGIN_MM["right"]) / 25.4 * 96)
WAIT_MS = 120_000

STATS_JS = """() => ({figures: document.querySelectorAll('.plotly-graph-div').length,
  math: document.querySelectorAll('mjx-container').length, mathErrors: document.querySelectorAll('mjx-merror').length,
  staticShown: Array.from(document.querySelectorAll('img.lora-static-figure')).filter(e => e.offsetParent !== null).length,
  chapters: Array.from(document.querySelectorAll('span[id^="document-"]')).map(s => s.id.slice(9))})"""

READY_JS = """() => window.MathJax && MathJax.startup && MathJax.startup.promise &&
  Array.from(document.querySelectorAll('.plotly-graph-div')).every(g => g._fullLayout && g.querySelector('.main-svg'))"""


def build_single_page():
    """jupyter-book's singlehtml build from the committed outputs, warnings as errors."""
    config = ROOT / "_config.yml"
    text = config.read_text()
    if "  execute_notebooks: force" not in text:
        raise RuntimeError("_config.yml has no 'execute_notebooks: force' line to turn off for the PDF build")
    with tempfile.NamedTemporaryFile("w", suffix=".yml", dir=ROOT, delete=False) as f:
        f.write(text.replace("  execute_notebooks: force", '  execute_notebooks: "off"'))
    try:
        subprocess.run([str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "--all", "-W", "-n",
                        "--keep-going", "--builder", "singlehtml", "--config", f.name], check=True, cwd=ROOT)
    finally:
        os.unlink(f.name)
    page = SINGLE / "index.html"                  # where book/_ext/pdf_edition.py puts the one page
    if not page.exists():
        raise RuntimeError(f"the singlehtml build wrote no {page}")
    return page


def print_pdf(page, out=OUT):
    """Serve the single page on 127.0.0.1, wait for MathJax and plotly, print it to ``out``.
    Returns what the page held: its figures, typeset formulas and documents. Nothing is fetched from
    another host, and a TeX error fails the build."""
    from playwright.sync_api import sync_playwright

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(SINGLE)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    blocked = []
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"])
            try:
                pg = browser.new_page(viewport={"width": VIEWPORT_PX, "height": 1100})
                pg.emulate_media(media="print")
                pg.route("**/*", lambda r: r.continue_() if r.request.url.startswith(base)
                         else (blocked.append(r.request.url), r.abort()))
                pg.goto(f"{base}/{page.relative_to(SINGLE).as_posix()}", wait_until="load", timeout=WAIT_MS)
                pg.wait_for_function(READY_JS, timeout=WAIT_MS)
                pg.evaluate("MathJax.startup.promise")
                stats = pg.evaluate(STATS_JS)
                if stats['mathErrors']:
                    raise RuntimeError(f"MathJax reports {stats['mathErrors']} TeX errors on the page")
                if stats["staticShown"]:                # each figure once: drawn, not also as its image
                    raise RuntimeError(f"{stats['staticShown']} static figure images shown beside the drawn figures")
                pg.pdf(path=str(tmp), format="A4", print_background=True, outline=True, tagged=True,
                       margin={side: f"{mm}mm" for side, mm in MARGIN_MM.items()},
                       display_header_footer=True, header_template="<span></span>",
                       footer_template='<div style="font-size:8px;width:100%;text-align:center">'
                                       '<span class="pageNumber"></span></div>')
            finally:
                browser.close()
    finally:
        server.shutdown()
    if blocked:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"the page asked other hosts for {sorted(set(blocked))[:5]}")
    tmp.replace(out)                               # in one piece: no half-written book.pdf
    return stats


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-build", action="store_true", help="print the existing _build/singlehtml page")
    args = ap.parse_args(argv)
    page = SINGLE / "index.html" if args.no_build else build_single_page()
    stats = print_pdf(page)
    site = ROOT / "_build" / "html"
    if site.is_dir():                              # the front page links to it (book/intro.md)
        shutil.copyfile(OUT, site / OUT.name)
    print(f"{OUT.relative_to(ROOT)}: {OUT.stat().st_size / 1e6:.1f} MB; {len(stats['chapters'])} documents, "
          f"{stats['figures']} figures, {stats['math']} formulas")


if __name__ == "__main__":
    main()
