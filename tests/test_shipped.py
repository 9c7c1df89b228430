"""lora_ref.shipped: the precomputed results come back with numeric keys as numbers, and a result
that could not come back unchanged is never written."""

import json

import pytest

from lora_ref import shipped

NAMES = sorted(p.stem for p in shipped.DATA.glob("*.json"))


def _keys(obj):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v)


@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_result_loads_with_no_number_left_as_a_string(name):
    data = shipped.load(name)
    assert isinstance(data, dict) and "settings" in data
    left = [k for k in _keys(data) if isinstance(k, str) and _looks_numeric(k)]
    assert not left, f"{name}: keys still strings: {left[:5]}"


def _looks_numeric(k):
    try:
        float(k)
        return True
    except ValueError:
        return False


def test_save_and_load_round_trip_numeric_keys(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "DATA", tmp_path)
    obj = {"settings": {"ranks": [1, 2]}, "runs": {8: {0: {"loss": [0.5, 0.25]}}, 0.5: {"x": 1},
                                                  "alpha/r": {-1: None, "08": True}}}
    path = shipped.save("result", obj)
    assert path == tmp_path / "result.json" and path.read_text().endswith("}\n")
    back = shipped.load("result")
    assert back == obj and list(back["runs"]) == [8, 0.5, "alpha/r"]
    assert type(list(back["runs"])[0]) is int and "08" in back["runs"]["alpha/r"]      # "08" is not 8


@pytest.mark.parametrize("obj, error, match", [
    ({"x": float("nan")}, ValueError, r"result\['x'\] is nan"),
    ({"runs": {"1": 2}}, ValueError, r"key '1' would read back as 1"),
    ({(1, 2): 0}, TypeError, "keys must be str, int or float"),
    ({"a": object()}, TypeError, r"JSON types only"),
    ({"a": {True: 1}}, TypeError, "is a bool"),
])
def test_save_refuses_what_load_could_not_give_back_and_writes_nothing(tmp_path, monkeypatch, obj, error, match):
    monkeypatch.setattr(shipped, "DATA", tmp_path)
    (tmp_path / "result.json").write_text('{"old": 1}')
    with pytest.raises(error, match=match):
        shipped.save("result", obj)
    assert json.loads((tmp_path / "result.json").read_text()) == {"old": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(shipped, "DATA", tmp_path)
    (tmp_path / "result.json").write_text('{"old": 1}')

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(shipped.os, "replace", broken)
    with pytest.raises(OSError, match="disk full"):
        shipped.save("result", {"new": 2})
    assert (tmp_path / "result.json").read_text() == '{"old": 1}' and len(list(tmp_path.iterdir())) == 1


def test_bad_names_and_missing_files_say_what_is_shipped():
    with pytest.raises(ValueError, match="file name in lora_ref/data"):
        shipped.path("../etc/passwd")
    with pytest.raises(FileNotFoundError, match=r"no shipped result nothing.json .* shipped: \['ch03_rank_sweep'"):
        shipped.load("nothing")


def test_a_saved_file_is_readable_as_any_checked_out_file(tmp_path, monkeypatch):
    """mkstemp makes its file 0600; the shipped file gets the mode the umask gives a new file."""
    import os

    monkeypatch.setattr(shipped, "DATA", tmp_path)
    umask = os.umask(0o022)
    try:
        mode = shipped.save("result", {"a": 1}).stat().st_mode & 0o777
    finally:
        os.umask(umask)
    assert mode == 0o644
