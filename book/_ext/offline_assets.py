"""Make the built book work without internet: no page loads anything from a CDN.

Two assets would come from a CDN:

- MathJax 3. We copy it from the ``django-static-mathjax`` wheel (MathJax 3.2.2,
  Apache-2.0) into ``_static/mathjax/`` and point Sphinx's ``mathjax_path`` at it.
- plotly.js. Figures are rendered with ``PLOTLY_RENDERER=notebook_connected``, whose
  HTML loads ``https://cdn.plot.ly/plotly-X.Y.Z.min.js`` and MathJax 2 from cdnjs.
  After the build we copy the plotly.js that ships inside the plotly Python package
  (the same version the renderer names) to ``_static/plotly.min.js`` and rewrite
  each page to load it; the MathJax 2 tag is dropped (the page already runs MathJax 3).

It also serves ``book/_static`` (the book's CSS for narrow screens and ``lora-figures.js``, which
lays the figures out for the page's real width and theme) and loads both on every page.

At the end, any ``<script src>`` or stylesheet ``<link href>`` that still points off
the site fails the build, so a new CDN dependency cannot slip in unnoticed.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from sphinx.errors import ExtensionError

MATHJAX_PARTS = ("tex-chtml.js", "input", "output", "a11y", "adaptors", "ui")

PLOTLY_CDN = re.compile(r"https://cdn\.plot\.ly/plotly-[0-9.]+\.min\.js")
PLOTLY_MODULE_IMPORT = re.compile(r'<script type="module">import "https://cdn\.plot\.ly/plotly-[0-9.]+\.min"</script>')
MATHJAX2_CDN = re.compile(r'<script src="https://cdnjs\.cloudflare\.com/ajax/libs/mathjax/[^"]+"></script>')
SRI = re.compile(r'(src="[^"]*_static/plotly\.min\.js")\s+integrity="[^"]*"\s+crossorigin="anonymous"')
# sphinx-thebe's config script is written twice into each page by Jupyter Book 1, which makes
# the second `const THEBE_JS_URL` a SyntaxError in the console; keep the first copy only.
THEBE_CONFIG = re.compile(r"<script>const THEBE_JS_URL = [^<]*</script>\n?")
EXTERNAL_ASSET = re.compile(r'<(?:script[^>]*\ssrc|link[^>]*rel="stylesheet"[^>]*\shref)="(https?:)?//([^"/]+)[^"]*"')


def _mathjax_es5():
    import mathjax  # the django-static-mathjax wheel

    root = Path(mathjax.__file__).parent / "static" / "mathjax" / "es5"
    if not (root / "tex-chtml.js").exists():
        raise ExtensionError(f"MathJax 3 not found at {root}; install django-static-mathjax")
    return root


def _plotly_js():
    import plotly

    path = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    if not path.exists():
        raise ExtensionError(f"plotly.min.js not found at {path}")
    return path


def _drop_repeats(pattern, html):
    seen = []

    def keep_first(m):
        if m.group(0) in seen:
            return ""
        seen.append(m.group(0))
        return m.group(0)

    return pattern.sub(keep_first, html)


def _rewrite(html, rel_static):
    html = _drop_repeats(THEBE_CONFIG, html)
    html = PLOTLY_MODULE_IMPORT.sub("", html)
    html = MATHJAX2_CDN.sub("", html)
    html = PLOTLY_CDN.sub(f"{rel_static}/plotly.min.js", html)
    return SRI.sub(r"\1", html)


def _copy_assets(static):
    es5 = _mathjax_es5()
    dest = static / "mathjax"
    for part in MATHJAX_PARTS:
        src = es5 / part
        if src.is_dir():
            shutil.copytree(src, dest / part, dirs_exist_ok=True)
        else:
            dest.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    shutil.copy2(_plotly_js(), static / "plotly.min.js")


def on_build_finished(app, exception):
    if exception is not None or app.builder.format != "html":
        return
    out = Path(app.outdir)
    static = out / "_static"
    _copy_assets(static)
    offending = []
    for page in out.rglob("*.html"):
        # singlehtml links its assets as if its one page sat at the root, where pdf_edition moves it
        rel_static = "_static" if app.builder.name == "singlehtml" else os.path.relpath(static, page.parent)
        rel_static = rel_static.replace(os.sep, "/")
        text = page.read_text(encoding="utf-8")
        new = _rewrite(text, rel_static)
        if new != text:
            page.write_text(new, encoding="utf-8")
        for m in EXTERNAL_ASSET.finditer(new):
            offending.append(f"{page.relative_to(out)}: {m.group(0)[:120]}")
    if offending:
        raise ExtensionError("pages still load assets from other hosts:\n  " + "\n  ".join(offending[:20]))


BOOK_STATIC = Path(__file__).resolve().parents[1] / "_static"    # book/_static: the book's own CSS and JS


def on_builder_inited(app):
    """Serve book/_static and load, on every page, the phone-safe CSS and the figure layout script."""
    if str(BOOK_STATIC) not in app.config.html_static_path:
        app.config.html_static_path.append(str(BOOK_STATIC))


def setup(app):
    app.connect("builder-inited", on_builder_inited)
    app.add_css_file("lora-book.css")
    app.add_js_file("lora-figures.js")
    app.connect("build-finished", on_build_finished)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
