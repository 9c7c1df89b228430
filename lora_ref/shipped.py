"""The shipped results: the small JSON files in ``lora_ref/data`` that ``tools/precompute_*.py``
write and the chapters read.

JSON keys are strings, while the sweeps are keyed by numbers (a rank r, a seed, a LoRA+ ratio,
a weight); ``save`` writes such keys as JSON does, and ``load`` gives them back as numbers, so a
chapter writes ``runs[8]``, not ``runs["8"]``:

* a key that is an integer written as Python writes it (``"8"``, ``"-1"``, not ``"08"``) -> int;
* a key that is a float written as Python writes it (``"0.5"``, ``"1e-05"``) -> float;
* every other key (a layer name, ``"alpha/r"``) stays a string.

``save`` refuses what ``load`` could not give back unchanged: NaN or infinite values, keys
other than str, int and float, and a string key that would read back as a number. It writes a
temporary file and renames it, so a failed write leaves the old file whole.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from importlib import resources
from pathlib import Path

__all__ = ["DATA", "path", "load", "save"]

DATA = Path(str(resources.files("lora_ref") / "data"))


def path(name: str) -> Path:
    """The file of the shipped result ``name`` ("ch05_loraplus" or "ch05_loraplus.json")."""
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"a shipped result is named by its file name in lora_ref/data, got {name!r}")
    return DATA / (name if name.endswith(".json") else name + ".json")


def _key(k: str):
    """A JSON key back as the number it was written from, or the string itself."""
    try:
        i = int(k)
        if str(i) == k:
            return i
    except ValueError:
        pass
    try:
        f = float(k)
        if math.isfinite(f) and repr(f) == k:
            return f
    except ValueError:
        pass
    return k


def _restore(pairs):
    out = {}
    for k, v in pairs:
        key = _key(k)
        if key in out:
            raise ValueError(f"two keys read back as {key!r}")
        out[key] = v
    return out


def load(name: str):
    """The shipped result ``name``, with numeric keys as numbers (see the module docstring)."""
    p = path(name)
    if not p.is_file():
        known = sorted(q.stem for q in DATA.glob("*.json"))
        raise FileNotFoundError(f"no shipped result {p.name} in {DATA}; shipped: {known}")
    return json.loads(p.read_text(), object_pairs_hook=_restore)


def _check(obj, where="the result"):
    """Raise if ``obj`` would not come back from save + load unchanged."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(k, bool) or not isinstance(k, (str, int, float)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}; keys must be str, int or float")
            text = k if isinstance(k, str) else json.dumps(k)
            back = _key(text)
            if back != k or type(back) is not type(k):            # "8" or 1e400: not itself after load
                raise ValueError(f"{where}: key {k!r} would read back as {back!r}")
            _check(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check(v, f"{where}[{i}]")
    elif isinstance(obj, float) and not math.isfinite(obj):
        raise ValueError(f"{where} is {obj}: JSON has no NaN or infinity")
    elif not (obj is None or isinstance(obj, (str, int, float, bool))):
        raise TypeError(f"{where} is a {type(obj).__name__}; shipped results hold JSON types only "
                        f"(convert arrays with .tolist())")


def save(name: str, obj) -> Path:
    """Write ``obj`` as the shipped result ``name`` (compact JSON, a final newline); returns the path.
    Nothing is written unless all of ``obj`` can be read back unchanged by ``load``."""
    _check(obj)
    text = json.dumps(obj, separators=(",", ":"), allow_nan=False) + "\n"
    p = path(name)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=p.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)          # mkstemp makes it private (0600); a data file is readable
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p
