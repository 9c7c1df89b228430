"""Every notebook has a MyST text twin (text/...md) with the same prose and code, so a diff reads."""

import importlib.util
from pathlib import Path

import nbformat
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


def test_carrying_text_back_keeps_the_committed_outputs(tmp_path, monkeypatch):
    """--to-notebooks on an unchanged pair writes the same notebook, outputs included."""
    nb_dir, text_dir = tmp_path / "notebooks", tmp_path / "text" / "notebooks"
    nb_dir.mkdir(parents=True)
    text_dir.mkdir(parents=True)
    src = ROOT / "notebooks" / "03_scaling.ipynb"
    (nb_dir / src.name).write_text(src.read_text())
    (text_dir / "03_scaling.md").write_text((ROOT / "text" / "notebooks" / "03_scaling.md").read_text())
    monkeypatch.setattr(notebook_text, "ROOT", tmp_path)
    notebook_text.write_notebooks()
    before = [c.get("outputs") for c in nbformat.read(src, as_version=4).cells]
    after = [c.get("outputs") for c in nbformat.read(nb_dir / src.name, as_version=4).cells]
    assert any(before) and after == before
