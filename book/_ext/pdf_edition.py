"""The book as one page (Sphinx's singlehtml builder), which tools/build_pdf.py prints to PDF.

sphinx-exercise registers its nodes for ``singlehtml`` by name, so Sphinx no longer falls back to the
``html`` handlers for that builder, and sphinx-proof registers its own for ``html`` only: the proofs
would have no translator there. On ``builder-inited`` the ``html`` handlers that ``singlehtml`` lacks
are copied over: one page renders every directive as the site does.

The page is written at the root document's path (book/intro.html) but links every asset as if it
sat at the root; on ``build-finished`` it is moved to ``index.html``, where those links hold.
"""

from __future__ import annotations

from pathlib import Path


def on_builder_inited(app):
    handlers = app.registry.translation_handlers
    if app.builder.name == "singlehtml" and "singlehtml" in handlers:
        for node, pair in handlers.get("html", {}).items():
            handlers["singlehtml"].setdefault(node, pair)


def on_build_finished(app, exception):
    if exception is not None or app.builder.name != "singlehtml":
        return
    out = Path(app.outdir)
    page = out / f"{app.config.root_doc}.html"
    if page != out / "index.html":
        page.replace(out / "index.html")


def setup(app):
    app.connect("builder-inited", on_builder_inited)
    app.connect("build-finished", on_build_finished, priority=900)      # after offline_assets' rewrite
    return {"parallel_read_safe": True, "parallel_write_safe": True}
