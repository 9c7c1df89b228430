"""lora_ref.tiny's training progress bar: tqdm.auto for live readers (Colab, a Jupyter server's
kernel, a terminal), off in the book build, under nbval and in CI, with or without the Makefile's
LORA_BOOK_QUIET=1 and CI=true: a kernel that nobody watches draws no bar."""

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
tqdm_auto = pytest.importorskip("tqdm.auto")

from lora_ref import tiny  # noqa: E402
from lora_ref.tiny import training  # noqa: E402


@pytest.fixture
def unwatched(monkeypatch):
    """A kernel as nbval starts it with no environment set: no LORA_BOOK_QUIET, no CI, no front end."""
    for name in ("LORA_BOOK_QUIET", "CI", "JPY_SESSION_NAME", "COLAB_RELEASE_TAG"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def live(unwatched):
    """A reader's kernel, started by a Jupyter server."""
    unwatched.setenv("JPY_SESSION_NAME", "/home/reader/08_qlora.ipynb")
    return unwatched


def test_no_bar_where_nobody_watches_even_without_the_makefiles_environment(unwatched):
    assert not training._live_reader()                     # pytest captures stderr: no terminal either
    assert training._progress_bar(5, enabled=True) is None


def test_colab_counts_as_a_live_reader(unwatched):
    unwatched.setenv("COLAB_RELEASE_TAG", "release-colab_20261201-060000_RC00")
    assert training._live_reader()


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
