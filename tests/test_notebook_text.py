"""Every notebook has a MyST text twin (text/...md) with the same prose and code, so a diff reads."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("notebook_text", ROOT / "tools" / "notebook_text.py")
notebook_text = importlib.util.module_from_spec(spec)
spec.loader.exec_module(notebook_text)


@pytest.mark.parametrize("notebook", notebook_text.notebooks(), ids=lambda p: p.name)
def test_text_twin_is_in_sync_with_its_notebook(notebook):
    twin = notebook_text.text_path(notebook)
    assert twin.exists(), f"no text twin: run `python tools/notebook_text.py` to write {twin.relative_to(ROOT)}"
    assert twin.read_text() == notebook_text.as_text(notebook), (
        f"{twin.relative_to(ROOT)} differs from {notebook.relative_to(ROOT)}: run `python tools/notebook_text.py` "
        "after editing a notebook, or `--to-notebooks` after editing the text"
    )


def test_every_text_twin_has_a_notebook():
    twins = sorted((ROOT / "text").rglob("*.md"))
    assert {notebook_text.text_path(nb) for nb in notebook_text.notebooks()} == set(twins)
