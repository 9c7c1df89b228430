"""What a checked cell prints: the libraries kept quiet, and numbers rounded where rounding is stable.

* ``quiet()`` silences what transformers, bitsandbytes and PEFT print on their own (info logs,
  progress bars, FutureWarnings, bitsandbytes' notices about optional kernels and paged
  optimizers on a CPU), so that a cell's output is the cell's. Call it once at the top of a
  notebook to keep it for the session, or use ``with quiet():`` to restore everything after.
* ``rounds_robustly(x, decimals)`` says whether a value that moves in its last bits between
  CPUs still prints the same rounded, for the values nbval compares.

Neither imports torch; ``quiet`` imports transformers only if it is installed.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import warnings

__all__ = ["quiet", "rounds_robustly"]

_LOGGERS = ("bitsandbytes", "peft")
_MESSAGES = ("Paged optimizers are not supported on CPU",)


class quiet:
    """Silence the libraries now; as a context manager, restore their settings on exit.

        lora_ref.quiet()              # a notebook: quiet from here on
        with lora_ref.quiet(): ...    # a test or a function: quiet inside only
    """

    def __init__(self):
        self._warnings = warnings.catch_warnings()          # saves the filters; exit restores them
        self._warnings.__enter__()
        self._levels = {name: logging.getLogger(name).level for name in _LOGGERS}
        self._hf = None
        if importlib.util.find_spec("transformers") is not None:
            from transformers.utils import logging as hf_logging

            self._hf = (hf_logging, hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled())
            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        for name in _LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        warnings.simplefilter("ignore", FutureWarning)
        for message in _MESSAGES:
            warnings.filterwarnings("ignore", message=message)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)
        if self._hf is not None:
            hf_logging, verbosity, bars = self._hf
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        return False


def rounds_robustly(x, decimals, rel_tol=1e-6):
    """True when every number within rel_tol * |x| of x prints the same at ``decimals`` decimals.

    For outputs that nbval compares across CPUs: a value computed with a summation order that
    depends on the SIMD path or the thread count moves in its last bits; printed rounded, it
    stays the same unless it sits within that much of a rounding boundary (a ...5 in the next
    decimal). rel_tol bounds how far the value may move.
    """
    scaled = abs(float(x)) * 10**decimals
    margin = abs(scaled - math.floor(scaled) - 0.5)                 # distance to the boundary, in units
    return margin > rel_tol * scaled
