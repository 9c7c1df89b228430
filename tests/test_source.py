"""lora_ref.source: the chapters show the library's own code next to the equations."""

import pytest

from lora_ref import numpy as ln
from lora_ref.source import source_markdown


def test_source_block_is_the_functions_own_code():
    md = source_markdown(ln.merge, ln.unmerge)
    assert md.startswith("```python\ndef merge(W0, A, B, scaling):") and md.endswith("```")
    assert "return W - delta_w(A, B, scaling)" in md


@pytest.mark.parametrize("bad", [(), (3,)])
def test_bad_input_is_refused(bad):
    with pytest.raises((ValueError, TypeError), match="show_source"):
        source_markdown(*bad)
