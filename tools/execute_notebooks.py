"""Execute notebooks in place, as the book build does, and report each one's time.

    python tools/execute_notebooks.py notebooks/*.ipynb

Used by `make execute` to refresh the committed outputs that nbval compares; each plotly figure
then gets its static image (tools/static_figures.py).
A chapter must execute in 60 s or less on 2 cores; a slower one fails here.
"""

import os
import sys
import time

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import static_figures

LIMIT_S = 60


def main(paths):
    os.environ.setdefault("PLOTLY_RENDERER", "notebook_connected")
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")       # see the Makefile
    os.environ.setdefault("MKL_DYNAMIC", "FALSE")
    slow = []
    for path in paths:
        nb = nbformat.read(path, as_version=4)
        t0 = time.perf_counter()
        client = NotebookClient(nb, timeout=600, kernel_name="python3",
                                resources={"metadata": {"path": os.path.dirname(path) or "."}})
        client.execute()
        seconds = time.perf_counter() - t0
        static_figures.add_static_figures(nb)        # an image of each figure, for viewers without JavaScript
        nbformat.write(nb, path)
        print(f"{path}: executed in {seconds:.1f} s")
        if seconds > LIMIT_S:
            slow.append(f"{path} ({seconds:.0f} s)")
    if slow:
        sys.exit(f"over the {LIMIT_S} s budget per chapter: {', '.join(slow)}")


if __name__ == "__main__":
    main(sys.argv[1:])
