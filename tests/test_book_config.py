"""The book's structure: one repository URL everywhere, chapters that nbval and Colab can run."""

import json
import re
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
REPO = CONFIG["repository"]["url"]
TOC_FILES = [TOC["root"]] + [c["file"] for part in TOC["parts"] for c in part["chapters"]]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").glob("*.ipynb"))
ALL_NOTEBOOKS = NOTEBOOKS + sorted((ROOT / "book").glob("*.ipynb"))


def _nb(path):
    return json.loads(path.read_text())


def _src(cell):
    return "".join(cell["source"])


def _tags(cell):
    return cell.get("metadata", {}).get("tags", [])


def test_every_toc_entry_exists_and_every_chapter_is_in_the_toc():
    for f in TOC_FILES:
        assert any((ROOT / f"{f}{ext}").exists() for ext in (".md", ".ipynb")), f
    for nb in NOTEBOOKS:
        assert f"notebooks/{nb.stem}" in TOC_FILES, f"{nb.name} is not in _toc.yml"


def test_chapters_are_named_NN_topic():
    assert NOTEBOOKS, "no chapters"
    for nb in NOTEBOOKS:
        assert re.fullmatch(r"\d\d_[a-z0-9_]+", nb.stem), nb.name


REF = str(CONFIG["repository"]["branch"])          # the release the book is pinned to (tools/publish.py)


def test_colab_is_configured_for_the_one_repository_at_one_release():
    assert CONFIG["launch_buttons"]["colab_url"] == "https://colab.research.google.com"
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", REPO)
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert REF == f"v{version}" or re.fullmatch(r"[0-9a-f]{40}", REF), \
        f"repository.branch is {REF!r}: pin a release tag v{version} or a commit, not a branch"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_first_cell_installs_lora_ref_from_the_one_repository(path):
    first = _nb(path)["cells"][0]
    src = _src(first)
    assert first["cell_type"] == "code"
    assert "nbval-skip" in _tags(first), "nbval must skip the install cell"
    assert "remove-cell" in first["metadata"].get("tags", []), "the book must hide the install cell"
    assert re.search(rf'"lora_ref\[[\w,]+\] @ git\+{re.escape(REPO)}@{re.escape(REF)}"', src), \
        f"install cell does not install {REPO}@{REF}"
    urls = set(re.findall(r"https://github\.com/[\w.-]+/[\w.-]+", json.dumps(_nb(path))))
    urls |= {m.split("/blob/")[0].replace("colab.research.google.com/github", "github.com")
             for m in re.findall(r"https://colab\.research\.google\.com/github/[^)\s\"]+", json.dumps(_nb(path)))}
    assert urls <= {REPO}, f"other repository URLs: {urls - {REPO}}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_links_to_itself_in_colab(path):
    text = json.dumps(_nb(path))
    slug = REPO.removeprefix("https://github.com/")
    assert f"https://colab.research.google.com/github/{slug}/blob/{REF}/notebooks/{path.name}" in text


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_with_outputs_and_checked_cells(path):
    cells = [c for c in _nb(path)["cells"] if c["cell_type"] == "code"]
    checked = [c for c in cells if "nbval-check-output" in _tags(c)]
    assert checked, "no cell tagged nbval-check-output: nbval would compare nothing"
    assert all(c["outputs"] for c in checked), "a checked cell without committed output"
    assert any("assert " in _src(c) for c in cells), "no assert ties the code to an equation"
    for c in cells:
        src = _src(c)
        if "figures.show(" in src or "widgets.interact" in src:
            assert {"nbval-ignore-output", "nbval-skip"} & set(_tags(c)), \
                f"figure or widget cell without the nbval-ignore-output tag:\n{src[:200]}"
            assert "nbval-check-output" not in _tags(c), f"a figure's output is never compared:\n{src[:200]}"
        for out in c["outputs"]:
            assert out["output_type"] != "error", f"committed error output in:\n{src[:200]}"
            assert out.get("name") != "stderr", f"committed stderr output in:\n{src[:200]}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_chapter_has_the_anatomy_of_the_style_guide(path):
    nb = _nb(path)
    md = "\n".join(_src(c) for c in nb["cells"] if c["cell_type"] == "markdown")
    code = "\n".join(_src(c) for c in nb["cells"] if c["cell_type"] == "code")
    assert re.search(r"\$\$[\s\S]+?\$\$ \(eq-", md), "no numbered equation"
    assert "## What to remember" in md
    assert "```{exercise}" in md and "```{solution-start}" in md and "```{solution-end}" in md
    assert "from lora_ref import exercises" in code and "figures.show(" in code
    assert "widgets.interact" in code, "no live-kernel widget"


@pytest.mark.parametrize("path", ALL_NOTEBOOKS, ids=lambda p: p.name)
def test_nbval_markers_are_cell_tags_not_comments_a_reader_would_see(path):
    """nbval reads the tags nbval-check-output / -ignore-output / -skip; a `# NBVAL_*` comment
    would be printed in the book's code cells."""
    for c in _nb(path)["cells"]:
        assert "NBVAL_" not in _src(c), f"`# NBVAL_*` comment in a cell; use a tag:\n{_src(c)[:200]}"
        assert not {t for t in _tags(c) if t.startswith("nbval") and t not in NBVAL_TAGS}, _tags(c)


NBVAL_TAGS = {"nbval-check-output", "nbval-ignore-output", "nbval-skip", "nbval-raises-exception"}
