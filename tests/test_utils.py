"""The shared writers: atomic writes (replacing or exclusive) and the CSV writer."""

import os

import pytest

from leukodetect.utils import atomic_write, atomic_write_text, write_csv


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "old")
    atomic_write_text(path, "new")
    assert path.read_text() == "new"
    assert os.listdir(tmp_path / "sub") == ["a.txt"]


def test_atomic_write_keeps_the_old_file_when_the_write_fails(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "old")

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(path, half_then_crash)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_atomic_write_leaves_no_file_when_the_first_write_fails(tmp_path):
    def crash(tmp):
        tmp.write_text("half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "a.txt", crash)
    assert os.listdir(tmp_path) == []


def test_exclusive_write_creates_a_new_file(tmp_path):
    path = atomic_write(tmp_path / "a.bin", lambda tmp: tmp.write_bytes(b"\x00\x01"), exclusive=True)
    assert path.read_bytes() == b"\x00\x01"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_exclusive_write_refuses_an_existing_file_and_leaves_it_untouched(tmp_path):
    path = atomic_write_text(tmp_path / "a.txt", "mine")
    with pytest.raises(FileExistsError):
        atomic_write(path, lambda tmp: tmp.write_text("theirs"), exclusive=True)
    assert path.read_text() == "mine"
    assert os.listdir(tmp_path) == ["a.txt"]


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    mask = os.umask(0o022)
    try:
        path = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_write_csv_columns_from_the_rows_in_first_seen_order(tmp_path):
    rows = [{"path": "a,b.png", "label": 1}, {"path": 'say "hi"', "prob": 0.25}]
    write_csv(tmp_path / "p.csv", rows)
    assert (tmp_path / "p.csv").read_bytes() == (
        b'path,label,prob\r\n"a,b.png",1,\r\n"say ""hi""",,0.25\r\n'
    )


def test_write_csv_given_columns_and_line_ending(tmp_path):
    rows = [{"b": None, "a": 2.5}]
    write_csv(tmp_path / "p.csv", rows, ["a", "b"], lineterminator="\n")
    assert (tmp_path / "p.csv").read_bytes() == b"a,b\n2.5,\n"


def test_write_csv_with_no_rows(tmp_path):
    write_csv(tmp_path / "header.csv", [], ["a", "b"])
    write_csv(tmp_path / "empty.csv", [])
    assert (tmp_path / "header.csv").read_bytes() == b"a,b\r\n"
    assert (tmp_path / "empty.csv").read_bytes() == b""


def test_write_csv_refuses_a_key_outside_the_columns(tmp_path):
    with pytest.raises(ValueError):
        write_csv(tmp_path / "p.csv", [{"a": 1, "z": 2}], ["a"])
    assert not (tmp_path / "p.csv").exists()
