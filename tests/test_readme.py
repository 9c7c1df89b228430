"""The README and the intro tell a newcomer the truth: every chapter of _toc.yml is in both maps,
with its title, and the README names every module of lora_ref/ and the modules each chapter uses."""

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
INTRO = (ROOT / "book" / "intro.md").read_text()
TOC = yaml.safe_load((ROOT / "_toc.yml").read_text())
CHAPTERS = [c["file"] for part in TOC["parts"] for c in part["chapters"] if c["file"].startswith("notebooks/")]
SHARED = {"figures", "exercises", "source"}          # every chapter uses these; the README says so once


def _title(notebook):
    """The chapter's H1, from its first markdown cell that has one."""
    for cell in json.loads((ROOT / f"{notebook}.ipynb").read_text())["cells"]:
        m = re.search(r"^# (.+)$", "".join(cell["source"]), re.M)
        if cell["cell_type"] == "markdown" and m:
            return m.group(1).strip()
    raise AssertionError(f"{notebook} has no title")


def _readme_chapter_rows():
    """{notebook path without .ipynb: (title, [modules])} from the README's chapter table."""
    rows = {}
    for line in README.split("## The book", 1)[1].split("\n## ", 1)[0].splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[2].startswith("`") and cells[2].endswith(".ipynb`"):
            rows[cells[2].strip("`").removesuffix(".ipynb")] = (cells[1], re.findall(r"`(\w+)`", cells[3]))
    return rows


def _imported_modules(notebook):
    """The lora_ref modules a chapter imports (``from lora_ref import a, b as c`` and ``from lora_ref.x``)."""
    src = "\n".join("".join(c["source"]) for c in json.loads((ROOT / f"{notebook}.ipynb").read_text())["cells"]
                    if c["cell_type"] == "code")
    found = set(re.findall(r"^from lora_ref\.(\w+)", src, re.M))
    for names in re.findall(r"^from lora_ref import (.+)$", src, re.M):
        found |= {n.strip().split(" as ")[0] for n in names.split(",")}
    return found


def test_readme_lists_every_chapter_with_its_title():
    rows = _readme_chapter_rows()
    assert list(rows) == CHAPTERS + ["book/errata"], "the README's chapter table is not _toc.yml's"
    for notebook, (title, _) in rows.items():
        assert title == _title(notebook), f"{notebook}: README says {title!r}, the chapter {_title(notebook)!r}"


def test_readme_names_the_modules_each_chapter_imports():
    for notebook, (_, modules) in _readme_chapter_rows().items():
        imported = _imported_modules(notebook) - SHARED
        assert set(modules) == imported, f"{notebook}: README names {sorted(modules)}, it imports {sorted(imported)}"


def test_readme_module_table_covers_lora_ref():
    table = README.split("## `lora_ref`, the reference implementation", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`lora_ref\.(\w+)", table))
    modules = {p.stem for p in (ROOT / "lora_ref").glob("*.py") if not p.stem.startswith("_")}
    modules |= {p.name for p in (ROOT / "lora_ref").iterdir() if (p / "__init__.py").exists()}
    assert modules - named == set(), f"the README's module table misses {sorted(modules - named)}"
    assert named - modules == set(), f"the README's module table names {sorted(named - modules)}, not in lora_ref/"


def test_intro_maps_every_chapter():
    mapped = re.findall(r"\{doc\}`\.\./(notebooks/\w+)`", INTRO.split("## Map of the book", 1)[1])
    assert mapped == CHAPTERS


def test_how_to_use_names_the_real_clone_command():
    text = (ROOT / "book" / "how_to_use.md").read_text()
    assert "<this repository>" not in text
    url = yaml.safe_load((ROOT / "_config.yml").read_text())["repository"]["url"]
    assert f"git clone {url}" in text
