"""Each notebook's text twin: a MyST markdown file that holds its prose and code, not its outputs.

    python tools/notebook_text.py                 write text/<notebook path>.md from every notebook
    python tools/notebook_text.py --to-notebooks  carry edits made in the .md files back into the
                                                  notebooks, keeping their committed outputs
    python tools/notebook_text.py --check         exit 1 if a pair is out of sync

The notebooks stay the source that nbval, the book and Colab run (they carry the outputs
that nbval compares); the text twins make a diff show prose and code line by line.
tests/test_notebook_text.py checks that every pair is in sync. jupytext does the conversion.
"""

import argparse
import sys
from pathlib import Path

import jupytext
import nbformat
from jupytext.combine import combine_inputs_with_outputs

ROOT = Path(__file__).resolve().parents[1]
FORMAT = "md:myst"


def notebooks():
    return sorted(ROOT.glob("notebooks/*.ipynb")) + sorted(ROOT.glob("book/*.ipynb"))


def text_path(notebook):
    """notebooks/02_forward_pass.ipynb -> text/notebooks/02_forward_pass.md"""
    return ROOT / "text" / notebook.relative_to(ROOT).with_suffix(".md")


def as_text(notebook):
    return jupytext.writes(nbformat.read(notebook, as_version=4), fmt=FORMAT)


def out_of_sync():
    """The notebooks whose text twin is missing or differs."""
    return [nb for nb in notebooks() if not text_path(nb).exists() or text_path(nb).read_text() != as_text(nb)]


def write_texts():
    for nb in notebooks():
        path = text_path(nb)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(as_text(nb))
        print(f"wrote {path.relative_to(ROOT)}")


def write_notebooks():
    for nb_path in notebooks():
        path = text_path(nb_path)
        if not path.exists():
            continue
        old = nbformat.read(nb_path, as_version=4)
        new = jupytext.reads(path.read_text(), fmt=FORMAT)
        new = combine_inputs_with_outputs(new, old, fmt=FORMAT)   # outputs and cell ids from the notebook (returns a copy)
        nbformat.write(new, nb_path)
        print(f"updated {nb_path.relative_to(ROOT)} from {path.relative_to(ROOT)}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--to-notebooks", action="store_true")
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args(argv)
    if args.check:
        stale = out_of_sync()
        for nb in stale:
            print(f"out of sync: {nb.relative_to(ROOT)} and {text_path(nb).relative_to(ROOT)}")
        return 1 if stale else 0
    if args.to_notebooks:
        write_notebooks()
    else:
        write_texts()
    return 0


if __name__ == "__main__":
    sys.exit(main())
