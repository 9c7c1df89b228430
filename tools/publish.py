"""Pin the book to one release: every chapter's Colab link and install cell name the same ref.

    python tools/publish.py                        pin to v<version of pyproject.toml>, at the URL in _config.yml
    python tools/publish.py --url URL              set repository.url first (a publisher's one step)
    python tools/publish.py --ref v0.2.0           pin to that tag (or --ref HEAD: the current commit)
    python tools/publish.py --check                exit 1 if a chapter names another URL or ref

`_config.yml` keeps the repository's address (repository.url) and the release (repository.branch,
which Jupyter Book's launch buttons open). This script writes both, then rewrites in every
notebook the install cell, `pip install "lora_ref[EXTRAS] @ git+URL@REF"`, and the link
`https://colab.research.google.com/github/OWNER/NAME/blob/REF/notebooks/NN_topic.ipynb`, keeping
the committed outputs, and the text twins. A reader who opens a chapter in Colab then installs
the lora_ref that the page was built from. A branch name is refused: a branch moves.
"""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import tomllib

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import notebook_text  # noqa: E402  (tools/ is not a package)

SPEC = re.compile(r"(lora_ref\[[\w,]+\] @ git\+)([^\s\"'@]+)(@[^\s\"']+)?")
COLAB = re.compile(r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[^/\s)\"]+/")
GITHUB = re.compile(r"https://github\.com/([\w.-]+)/([\w.-]+)")


def version(root=ROOT):
    return tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"]


def config_value(root, key):
    """repository.url or repository.branch, read from the text of _config.yml (comments kept)."""
    block = (root / "_config.yml").read_text().split("\nrepository:\n", 1)[1]
    match = re.search(rf"^  {key}:\s*(\S+)", block, re.M)
    if match is None:
        raise SystemExit(f"_config.yml has no repository.{key}")
    return match.group(1)


def set_config_value(root, key, value):
    path = root / "_config.yml"
    head, block = path.read_text().split("\nrepository:\n", 1)
    block, n = re.subn(rf"^(  {key}:\s*)\S+", lambda m: m.group(1) + value, block, count=1, flags=re.M)
    if n != 1:
        raise SystemExit(f"_config.yml has no repository.{key}")
    path.write_text(head + "\nrepository:\n" + block)


def resolve_ref(root, ref):
    """A tag name as given, or a commit as its full hash; never a branch."""
    inside = subprocess.run(["git", "-C", str(root), "rev-parse", "--git-dir"], capture_output=True).returncode == 0
    repo = root if inside else ROOT               # a copy of the book outside git resolves refs in this repository

    def git(*args):
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True)

    if not re.fullmatch(r"[\w.\-/]+", ref):
        raise SystemExit(f"--ref {ref!r} is not a tag or commit name")
    if git("show-ref", "--verify", "--quiet", f"refs/heads/{ref}").returncode == 0 or ref in ("main", "master"):
        raise SystemExit(f"--ref {ref!r} is a branch, which moves; pin a tag (v{version(root)}) or a commit")
    if re.fullmatch(r"v\d+(\.\d+)*", ref):
        return ref                                              # a release tag, created when the book is published
    out = git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    if out.returncode != 0:
        raise SystemExit(f"--ref {ref!r} is neither a release tag v<version> nor a commit of this repository")
    return out.stdout.strip()


def chapter_notebooks(root):
    return sorted(root.glob("notebooks/*.ipynb")) + sorted(root.glob("book/*.ipynb"))


def pinned(source, url, ref):
    """The source with every install spec and Colab link pointing at url@ref."""
    owner, name = GITHUB.fullmatch(url).groups() if GITHUB.fullmatch(url) else ("", "")
    source = SPEC.sub(lambda m: f"{m.group(1)}{url}@{ref}", source)
    if owner:
        source = COLAB.sub(f"https://colab.research.google.com/github/{owner}/{name}/blob/{ref}/", source)
    return source


def mismatches(root, url, ref):
    """(notebook, what) for every install spec or Colab link that names another URL or ref."""
    found = []
    for path in chapter_notebooks(root):
        for cell in nbformat.read(path, as_version=4).cells:
            if cell.source != pinned(cell.source, url, ref):
                found.append((path.relative_to(root), cell.source[:80]))
    return found


PAGES = ("README.md", "book/how_to_use.md")       # they name the address too: the clone and the install line


def publish(root, url, ref):
    old_url = config_value(root, "url")
    for name in PAGES:
        page = root / name
        if page.exists():
            page.write_text(pinned(page.read_text().replace(old_url, url), url, ref))
    set_config_value(root, "url", url)
    set_config_value(root, "branch", ref)
    for path in chapter_notebooks(root):
        nb = nbformat.read(path, as_version=4)
        changed = False
        for cell in nb.cells:
            new = pinned(cell.source, url, ref)
            changed |= new != cell.source
            cell.source = new
        if changed:
            nbformat.write(nb, path)
            twin = root / "text" / path.relative_to(root).with_suffix(".md")
            if twin.exists():
                twin.write_text(notebook_text.as_text(path))       # the text twin follows its notebook


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="the repository's https://github.com/OWNER/NAME (default: _config.yml's)")
    parser.add_argument("--ref", help="a release tag or a commit (default: v<version>)")
    parser.add_argument("--check", action="store_true", help="only report chapters that name another URL or ref")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    root = args.root.resolve()
    url = args.url or config_value(root, "url")
    if not (GITHUB.fullmatch(url) or url.startswith("file://")):
        raise SystemExit(f"--url must be https://github.com/OWNER/NAME, got {url!r}")
    if args.check:
        ref = config_value(root, "branch")
        bad = mismatches(root, url, ref)
        for path, what in bad:
            print(f"{path}: not pinned to {url}@{ref}: {what!r}")
        return 1 if bad else 0
    ref = resolve_ref(root, args.ref or f"v{version(root)}")
    publish(root, url, ref)
    print(f"pinned {len(chapter_notebooks(root))} notebooks to {url}@{ref}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
