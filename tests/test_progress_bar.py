"""lora_ref.tiny's training progress bar: tqdm.auto for live readers, off in the book build,
under nbval (LORA_BOOK_QUIET=1, exported by the Makefile) and in CI (CI=true)."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
tqdm_auto = pytest.importorskip("tqdm.auto")

from lora_ref import tiny  # noqa: E402
from lora_ref.tiny import training  # noqa: E402


@pytest.fixture
def live(monkeypatch):
    """A reader's kernel: neither LORA_BOOK_QUIET nor CI set."""
    monkeypatch.delenv("LORA_BOOK_QUIET", raising=False)
    monkeypatch.delenv("CI", raising=False)
    return monkeypatch


def test_progress_bar_is_a_tqdm_auto_bar_for_a_live_reader(live):
    bar = training._progress_bar(5, enabled=True)
    try:
        assert isinstance(bar, tqdm_auto.tqdm) and bar.total == 5
    finally:
        bar.close()


@pytest.mark.parametrize("name, value", [("LORA_BOOK_QUIET", "1"), ("CI", "true"), ("CI", "True"), ("CI", "1")])
def test_progress_bar_is_off_in_the_book_build_nbval_and_ci(live, name, value):
    live.setenv(name, value)
    assert training._progress_bar(5, enabled=True) is None


def test_progress_bar_is_off_unless_asked_for(live):
    assert training._progress_bar(5, enabled=False) is None


def _train_two_steps():
    model = tiny.build_tiny_llama(seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    tiny.train(model, tiny.task_examples(n=4), steps=2, batch_size=2, warmup=1, progress=True)


def test_train_draws_the_bar_on_stderr_only_for_a_live_reader(live, capfd):
    _train_two_steps()
    assert "training" in capfd.readouterr().err           # the bar's description, desc="training"
    live.setenv("LORA_BOOK_QUIET", "1")
    _train_two_steps()
    out = capfd.readouterr()
    assert out.err == "" and out.out == ""
