"""Show a function of ``lora_ref`` next to the equation it computes.

    from lora_ref.source import show_source
    show_source(ln.lora_forward)

renders the function's source as a Python code block, in the built book and in a live
kernel (Jupyter, Colab) alike, so a reader sees the formula and its code side by side and
the code shown is always the code that runs.
"""

from __future__ import annotations

import inspect

__all__ = ["source_markdown", "show_source"]


def source_markdown(*fns):
    """The source of each function as one fenced Python block, in Markdown."""
    if not fns:
        raise ValueError("show_source needs at least one function")
    parts = []
    for fn in fns:
        if not callable(fn):
            raise TypeError(f"show_source takes functions or classes, got {fn!r}")
        parts.append(inspect.getsource(fn).rstrip())
    return "```python\n" + "\n\n\n".join(parts) + "\n```"


def show_source(*fns):
    """Display the source of ``fns`` as a highlighted code block (IPython's Markdown)."""
    from IPython.display import Markdown

    return Markdown(source_markdown(*fns))
