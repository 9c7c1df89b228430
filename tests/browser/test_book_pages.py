"""A real browser on the built book: figures draw, sliders change them, math renders, offline.

Debian's chromium, driven by Playwright (never `playwright install`). The site in
_build/html is served on 127.0.0.1 and every request to any other host is blocked
and recorded, so a page that needs the internet fails here.

Locally the test skips, loudly, when chromium is absent; under CI=true it fails.
"""

import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SITE = ROOT / "_build" / "html"
CHROMIUM = "/usr/bin/chromium"
# pydata-sphinx-theme logs this at every first visit (no saved light/dark choice); it is not ours.
THEME_NOISE = re.compile(r"^Got invalid theme mode")


def _chapter_pages():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    files = [c["file"] for part in toc["parts"] for c in part["chapters"]]
    return [f for f in files if (ROOT / f"{f}.ipynb").exists()]


CHAPTERS = _chapter_pages()


def _all_pages():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return [toc["root"]] + [c["file"] for part in toc["parts"] for c in part["chapters"]]


@pytest.fixture(scope="module")
def site_url():
    if not (SITE / "index.html").exists():
        pytest.fail(f"no built book at {SITE}: run 'make book' first")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(SITE)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        message = f"chromium not found at {CHROMIUM}: install it with 'apt-get install -y chromium'"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        print(f"\n\n*** SKIPPING THE BROWSER TEST: {message} ***\n")
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync"],
        )
        yield b
        b.close()


def _new_page(browser, site_url, width):
    context = browser.new_context(viewport={"width": width, "height": 1000 if width > 600 else 844})
    pg = context.new_page()
    pg.blocked, pg.errors = [], []

    def route(r):
        if r.request.url.startswith(site_url):
            r.continue_()
        else:
            pg.blocked.append(r.request.url)
            r.abort()

    pg.route("**/*", route)
    pg.on("console", lambda m: m.type == "error" and not THEME_NOISE.search(m.text) and pg.errors.append(m.text))
    pg.on("pageerror", lambda e: pg.errors.append(str(e)))
    return context, pg


@pytest.fixture
def page(browser, site_url):
    context, pg = _new_page(browser, site_url, 1300)
    yield pg
    context.close()


@pytest.fixture(params=[1280, 390], ids=["desktop-1280px", "phone-390px"])
def sized_page(request, browser, site_url):
    context, pg = _new_page(browser, site_url, request.param)
    pg.width = request.param
    yield pg
    context.close()


def _open(page, site_url, chapter):
    page.goto(f"{site_url}/{chapter}.html", wait_until="load")
    page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=20_000)
    page.evaluate("MathJax.startup.promise")
    page.wait_for_function(
        "Array.from(document.querySelectorAll('.plotly-graph-div')).every(g => g._fullLayout && g.querySelector('.main-svg'))",
        timeout=20_000,
    )


def test_the_book_has_chapters():
    assert len(CHAPTERS) >= 2, CHAPTERS


@pytest.mark.parametrize("chapter", CHAPTERS)
def test_page_works_offline_with_math_figures_and_a_colab_link(page, site_url, chapter):
    _open(page, site_url, chapter)
    n_math = page.locator("mjx-container").count()
    assert n_math > 0, "MathJax rendered no equation"
    assert page.locator("mjx-merror").count() == 0, "MathJax reports a TeX error"
    if "notebooks/" in chapter:
        assert page.locator(".plotly-graph-div").count() >= 1, "a chapter without a figure"
    # a drawn trace: an SVG group of class "trace" (lines, bars, markers) or "hm" (a heatmap's image)
    drawn = page.evaluate(
        "Array.from(document.querySelectorAll('.plotly-graph-div')).map(g => g._fullData.length > 0 && "
        "g.querySelectorAll('.main-svg .trace, .main-svg .hm').length > 0)"
    )
    assert all(drawn), f"figures that did not draw: {drawn}"
    # the static images of the committed outputs (tools/static_figures.py) give way to the drawn figures
    shown = page.eval_on_selector_all("img.lora-static-figure", "els => els.filter(e => e.offsetParent !== null).length")
    assert shown == 0, f"{shown} static images still shown beside their interactive figures"
    assert page.blocked == [], f"the page asked other hosts for: {sorted(set(page.blocked))[:5]}"
    assert page.errors == [], f"console errors: {page.errors[:5]}"
    if chapter.startswith("notebooks/"):                    # and its Colab badge opens this notebook
        hrefs = page.eval_on_selector_all("a[href*='colab.research.google.com']", "els => els.map(e => e.href)")
        ref = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["branch"]
        assert any(h.endswith(f"/blob/{ref}/{chapter}.ipynb") for h in hrefs), hrefs


@pytest.mark.parametrize("chapter", [c for c in CHAPTERS if c.startswith("notebooks/")])
def test_moving_each_slider_changes_the_figure(page, site_url, chapter):
    _open(page, site_url, chapter)
    graphs = page.locator(".plotly-graph-div")
    n_sliders = 0
    for i in range(graphs.count()):
        g = graphs.nth(i)
        if not g.evaluate("g => (g._fullLayout.sliders || []).length"):
            continue
        n_sliders += 1
        state = "g => [g._fullData.filter(t => t.visible === true).map(t => t.index).join(','), g._fullLayout.title.text]"
        before = g.evaluate(state)
        g.scroll_into_view_if_needed()
        rail = g.locator(".slider-rail-rect").first.bounding_box()
        active = g.evaluate("g => g._fullLayout.sliders[0].active")
        n_steps = g.evaluate("g => g._fullLayout.sliders[0].steps.length")
        assert n_steps > 1, "a slider with one step"
        target = 0 if active > 0 else n_steps - 1            # a step other than the current one: an end
        x = rail["x"] + 2 if target == 0 else rail["x"] + rail["width"] - 2
        page.mouse.click(x, rail["y"] + rail["height"] / 2)  # a real click on the rail
        page.wait_for_timeout(300)
        after = g.evaluate(state)
        assert g.evaluate("g => g._fullLayout.sliders[0].active") == target
        assert after[0] != before[0], "the slider did not change which traces are drawn"
        assert after[1] != before[1], "the slider did not change the title"
    assert n_sliders >= 1, "a chapter without a slider"
    assert page.errors == [], page.errors[:5]


def test_no_built_page_shows_a_test_marker():
    """nbval's markers are cell tags: a reader of the book never sees `# NBVAL_...` in the code."""
    if not (SITE / "index.html").exists():
        pytest.fail(f"no built book at {SITE}: run 'make book' first")
    pages = sorted(SITE.rglob("*.html"))
    assert len(pages) >= len(CHAPTERS)
    marked = [str(p.relative_to(SITE)) for p in pages if "NBVAL_" in p.read_text(errors="replace")]
    assert marked == [], f"pages that show an nbval marker: {marked}"


# For every figure: the boxes that must not overlap, as the browser drew them (after
# book/_static/lora-figures.js has fitted the figure to the page's width).
LAYOUT_BOXES = """g => {
  const box = el => { if (!el) return null; const r = el.getBoundingClientRect();
                      return (r.width || r.height) ? {l: r.left, r: r.right, t: r.top, b: r.bottom} : null; };
  const all = sel => Array.from(g.querySelectorAll(sel)).map(box).filter(Boolean);
  const fig = box(g.querySelector('.main-svg'));
  const size = g._fullLayout._size;
  return {
    fig, plotTop: fig && fig.t + size.t,
    title: box(g.querySelector('.gtitle')), legend: box(g.querySelector('.legend')),
    xtitles: all('.g-xtitle, .g-x2title, .g-x3title'), y2title: box(g.querySelector('.g-y2title')),
    yticks: all('.subplot.xy .yaxislayer-above text, .subplot.xy .yaxislayer-below text'),
    slider: all('.slider-current-value, .slider-label'),
    modebar: box(g.querySelector('.modebar-container .modebar')),
    shows: g._fullData.filter(t => t.visible === true).some(t => {
             const vals = a => a == null ? [] : ArrayBuffer.isView(a) ? Array.from(a)
                             : Array.isArray(a) ? a.flatMap(vals) : [a];
             return vals(t.y).concat(vals(t.z)).some(v => v !== 0 && v !== null && Number.isFinite(Number(v)));
           }),
  };
}"""


def _overlap(a, b, slack=1.0):
    return a and b and a["l"] < b["r"] - slack and b["l"] < a["r"] - slack and a["t"] < b["b"] - slack and b["t"] < a["b"] - slack


@pytest.mark.parametrize("chapter", [c for c in CHAPTERS if c.startswith("notebooks/")])
def test_figures_lay_out_without_collisions_on_a_desktop_and_a_phone(sized_page, site_url, chapter):
    page = sized_page
    _open(page, site_url, chapter)
    page.wait_for_timeout(400)                                   # lora-figures.js refits after the first draw
    problems = []
    graphs = page.locator(".plotly-graph-div")
    for i in range(graphs.count()):
        b = graphs.nth(i).evaluate(LAYOUT_BOXES)
        where = f"figure {i}"
        if not b["shows"]:
            problems.append(f"{where}: opens on a state that draws nothing but zeros")
        if b["title"] and (b["title"]["r"] > b["fig"]["r"] + 1 or b["title"]["l"] < b["fig"]["l"] - 1):
            problems.append(f"{where}: the title is cut off ({b['title']} in {b['fig']})")
        if b["title"] and b["title"]["b"] > b["plotTop"] + 1:
            problems.append(f"{where}: the title runs into the plot")
        if _overlap(b["title"], b["legend"]):
            problems.append(f"{where}: the legend covers the title")
        for s in b["slider"]:
            for x in b["xtitles"]:
                if _overlap(s, x):
                    problems.append(f"{where}: the slider's label lies on an x-axis title")
        if b["y2title"] and any(_overlap(b["y2title"], y) for y in b["yticks"]):
            problems.append(f"{where}: the right panel's y-axis title lies on the left panel's tick labels")
        if page.width < 600 and b["modebar"] and _overlap(b["modebar"], b["title"]):
            problems.append(f"{where}: the toolbar covers the title")
    assert problems == [], f"{page.width} px: " + "; ".join(problems[:8])


@pytest.mark.parametrize("chapter", _all_pages())
def test_every_page_fits_a_phone_without_sideways_scrolling(browser, site_url, chapter):
    context, page = _new_page(browser, site_url, 390)
    try:
        page.goto(f"{site_url}/{chapter}.html", wait_until="load")
        page.wait_for_timeout(300)
        width = page.evaluate("document.documentElement.scrollWidth")
        wide = page.evaluate("""() => Array.from(document.querySelectorAll('.bd-article *')).filter(e => {
            const r = e.getBoundingClientRect(); return r.right > window.innerWidth + 1 && r.width > 0 &&
              !e.closest('table, pre, .highlight, .cell_output, mjx-container, .MathJax, .math');
          }).slice(0, 3).map(e => e.tagName + '.' + e.className + ': ' + (e.textContent || '').slice(0, 50))""")
        assert width <= 391, f"the page is {width} px wide at 390 px; too wide: {wide}"
    finally:
        context.close()


@pytest.mark.parametrize("chapter", ["notebooks/06_eckart_young"])
def test_figures_follow_the_dark_theme(page, site_url, chapter):
    _open(page, site_url, chapter)
    page.evaluate("document.documentElement.setAttribute('data-theme', 'dark')")
    page.wait_for_timeout(600)
    looks = page.evaluate("Array.from(document.querySelectorAll('.plotly-graph-div')).map(g => "
                          "[g._fullLayout.paper_bgcolor, g._fullLayout.font.color])")
    assert looks and all(bg in ("rgba(0, 0, 0, 0)", "rgba(0,0,0,0)") and font != "#2a3f5f" for bg, font in looks), looks


@pytest.mark.parametrize("chapter", [c for c in CHAPTERS if c.startswith("notebooks/")])
def test_a_committed_notebook_shows_every_figure_without_javascript(browser, tmp_path, chapter):
    """What GitHub's viewer or any script-stripping viewer gets: nbconvert's HTML of the committed
    notebook, code hidden, in a browser with JavaScript off. Each figure shows as its image."""
    from nbconvert import HTMLExporter

    html, _ = HTMLExporter(exclude_input=True).from_filename(str(ROOT / f"{chapter}.ipynb"))
    out = tmp_path / "page.html"
    out.write_text(html)
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, java_script_enabled=False)
    try:
        pg = context.new_page()
        pg.route("**/*", lambda r: r.continue_() if r.request.url.startswith("file:") else r.abort())
        pg.goto(out.as_uri(), wait_until="load")
        figures = pg.locator(".plotly-graph-div").count()
        images = pg.eval_on_selector_all(
            "img.lora-static-figure",
            "els => els.map(e => [e.complete && e.naturalWidth, Math.round(e.getBoundingClientRect().height)])")
    finally:
        context.close()
    assert figures >= 1 and len(images) == figures, (figures, images)
    assert all(width == 720 and height > 200 for width, height in images), images
