"""tools/publish.py pins every chapter to one URL and release, and a chapter's install cell works.

The install cell is run as Colab runs it, in a fresh virtual environment, against a file:// clone
of this repository at the pinned release; then the chapter's imports. Nothing is downloaded: pip
runs with --no-index, and the book's dependencies come from this environment's site-packages
(lora_ref itself left out), so only the clone's lora_ref is installed.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import publish  # noqa: E402

URL, REF = publish.config_value(ROOT, "url"), publish.config_value(ROOT, "branch")


def _copy_book(tmp_path):
    root = tmp_path / "book"
    for name in ("_config.yml", "pyproject.toml", "README.md"):
        root.mkdir(exist_ok=True)
        shutil.copy(ROOT / name, root / name)
    for folder in ("notebooks", "book", "text"):
        shutil.copytree(ROOT / folder, root / folder, ignore=shutil.ignore_patterns("_ext", "*.md", "*.bib")
                        if folder == "book" else None)
    return root


def test_every_chapter_is_pinned_to_the_configured_release():
    assert publish.mismatches(ROOT, URL, REF) == []
    assert publish.main(["--check"]) == 0


def test_publish_rewrites_the_url_the_ref_the_links_and_the_text_twins(tmp_path):
    root = _copy_book(tmp_path)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert publish.main(["--root", str(root), "--url", "https://github.com/someone/their-lora-book",
                         "--ref", "HEAD"]) == 0
    assert publish.config_value(root, "url") == "https://github.com/someone/their-lora-book"
    assert publish.config_value(root, "branch") == commit                  # HEAD, resolved to a commit
    chapter = nbformat.read(root / "notebooks" / "04_initialisation.ipynb", as_version=4)
    text = json.dumps([c.source for c in chapter.cells])
    assert f"git+https://github.com/someone/their-lora-book@{commit}" in text
    assert f"colab.research.google.com/github/someone/their-lora-book/blob/{commit}/notebooks/" in text
    assert URL not in text
    assert any(c.get("outputs") for c in chapter.cells if c.cell_type == "code")   # outputs kept
    twin = (root / "text" / "notebooks" / "04_initialisation.md").read_text()
    assert f"their-lora-book@{commit}" in twin
    assert publish.main(["--root", str(root), "--check"]) == 0
    readme = (root / "README.md").read_text()
    assert f"git+https://github.com/someone/their-lora-book@{commit}" in readme and URL not in readme


def test_publish_refuses_a_branch_and_an_unknown_ref(tmp_path):
    root = _copy_book(tmp_path)
    for ref, message in (("main", "is a branch"), ("no-such-ref", "neither a release tag")):
        with pytest.raises(SystemExit, match=message):
            publish.main(["--root", str(root), "--ref", ref])
    assert publish.config_value(root, "branch") == REF                    # nothing written


def _fresh_venv_with_the_books_dependencies(tmp_path):
    """A new venv whose site-packages reaches this environment's packages, lora_ref excepted."""
    venv = tmp_path / "venv"
    subprocess.run([sys.base_prefix + "/bin/python3", "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run([python, "-m", "pip", "uninstall", "-q", "-y", "setuptools"], check=True)   # the venv's old one
    overlay = tmp_path / "deps"
    overlay.mkdir()
    site = Path(sysconfig.get_paths()["purelib"])
    for entry in site.iterdir():
        if not entry.name.startswith(("lora_ref", "__editable__", "_lora_ref")) and entry.suffix != ".pth":
            (overlay / entry.name).symlink_to(entry)
    venv_site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip()
    Path(venv_site, "book_dependencies.pth").write_text(f"{overlay}\n")
    return python


@pytest.mark.slow
def test_a_chapters_install_cell_installs_the_pinned_release_in_a_fresh_venv(tmp_path):
    clone = tmp_path / "repo.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(ROOT), str(clone)], check=True)
    if not REF.startswith("v"):
        pytest.fail(f"the book is pinned to {REF}; this test clones a release tag")
    subprocess.run(["git", "-C", str(clone), "tag", "-f", REF, "HEAD"], check=True, capture_output=True)
    python = _fresh_venv_with_the_books_dependencies(tmp_path)
    cells = nbformat.read(ROOT / "notebooks" / "04_initialisation.ipynb", as_version=4).cells
    install = cells[0].source
    imports = next(c.source for c in cells[1:] if c.cell_type == "code")            # the chapter's imports
    assert "from lora_ref import" in imports
    install = install.replace(f"git+{URL}@{REF}", f"git+file://localhost{clone}@{REF}")
    assert f"file://localhost{clone}@{REF}" in install
    script = tmp_path / "first_cells.py"
    script.write_text(install + "\n" + imports + "\nimport lora_ref\nprint('LORA_REF_AT', lora_ref.__file__)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON", "VIRTUAL_ENV"))}
    env.update(PIP_NO_INDEX="1", PIP_NO_BUILD_ISOLATION="0", PIP_DISABLE_PIP_VERSION_CHECK="1",
               PIP_CONFIG_FILE=os.devnull, PLOTLY_RENDERER="json")
    run = subprocess.run([python, str(script)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Installing lora_ref failed" not in run.stdout, run.stdout
    where = run.stdout.split("LORA_REF_AT", 1)[1].strip()
    assert str(tmp_path / "venv") in where, f"lora_ref came from {where}, not from the install cell"
