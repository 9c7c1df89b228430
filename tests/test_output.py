"""lora_ref.output: quiet() silences the libraries (and restores them as a context manager);
rounds_robustly says when a rounded print is stable."""

import logging
import warnings

from lora_ref import output


def test_rounds_robustly():
    assert output.rounds_robustly(0.0065385, 5) and not output.rounds_robustly(0.012345, 5)
    assert not output.rounds_robustly(2.5, 0) and output.rounds_robustly(2.4, 0)
    assert output.rounds_robustly(3.8849876, 3, rel_tol=1e-9) and not output.rounds_robustly(3.8845000001, 3, rel_tol=1e-6)


def test_quiet_silences_transformers_bitsandbytes_and_future_warnings_and_restores_them():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_warning()
    hf_logging.enable_progress_bar()
    logging.getLogger("bitsandbytes").setLevel(logging.INFO)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        with output.quiet():
            assert hf_logging.get_verbosity() == hf_logging.ERROR and not hf_logging.is_progress_bar_enabled()
            assert logging.getLogger("bitsandbytes").level == logging.ERROR
            with warnings.catch_warnings(record=True) as caught:
                warnings.warn("old", FutureWarning, stacklevel=1)
                warnings.warn("Paged optimizers are not supported on CPU", UserWarning, stacklevel=1)
                warnings.warn("kept", UserWarning, stacklevel=1)
            assert [str(w.message) for w in caught] == ["kept"]
        assert hf_logging.get_verbosity() == hf_logging.WARNING and hf_logging.is_progress_bar_enabled()
        assert logging.getLogger("bitsandbytes").level == logging.INFO
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("old", FutureWarning, stacklevel=1)
        assert len(caught) == 1
