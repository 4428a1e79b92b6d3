"""Outputs that cannot be written (a path under a file, an existing file, a full disk, a closed standard output):
one sentence naming the path and what to do, status 2, no traceback and nothing half-written.

The suite runs as root, whom chmod does not stop: a path under a regular file (NotADirectoryError) and a
writer that raises ENOSPC stand in for a read-only folder and a full disk.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from leukodetect.cli import _output_error, app

runner = CliRunner()
TINY = ["--arch", "tiny", "--image-size", "24", "--batch-size", "8", "--lr", "0.01", "--epochs", "1"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def one_sentence(result, *phrases: str) -> str:
    """The error, with rich's line wrapping undone, after checking it is one sentence and no traceback."""
    text = " ".join(result.output.split())
    assert result.exit_code == 2, result.output
    assert "Traceback" not in text and text.startswith("error:") and text.count(". ") == 0, text
    for phrase in phrases:
        assert phrase in text, (phrase, text)
    return text


@pytest.fixture
def a_file(tmp_path) -> Path:
    path = tmp_path / "results.txt"
    path.write_text("a file, not a folder")
    return path


@pytest.mark.parametrize("command", ["train", "cv"])
def test_train_and_cv_refuse_an_out_under_a_file_or_on_a_file(command, tiny_tree, a_file):
    under = invoke(command, "--data", tiny_tree, "--out", a_file / "run", *TINY)
    one_sentence(under, f"{a_file / 'run'} cannot be made: {a_file} is a file, not a folder", "choose another --out")
    on = invoke(command, "--data", tiny_tree, "--out", a_file, *TINY)
    one_sentence(on, f"{a_file} is a file, where --out needs a folder")
    assert a_file.read_text() == "a file, not a folder"


def test_detect_refuses_an_out_under_a_file_before_reading_any_image(smear_png, a_file):
    result = invoke("detect", smear_png, "--locate-only", "--out", a_file / "detections")
    one_sentence(result, f"{a_file} is a file, not a folder")


def test_explain_refuses_an_out_under_a_file(crop_checkpoint, tiny_tree, a_file):
    cell = tiny_tree / "blast" / "blast_01.png"
    result = invoke("explain", cell, "--checkpoint", crop_checkpoint, "--out", a_file / "overlay.png")
    one_sentence(result, f"{a_file} is a file, not a folder")


def test_a_full_disk_during_training_is_one_sentence_naming_the_run(tiny_tree, tmp_path, monkeypatch):
    def full(path, obj):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("leukodetect.jobs.train.write_json", full)  # split.json, the first file the run writes
    result = invoke("train", "--data", tiny_tree, "--out", tmp_path / "run", *TINY)
    one_sentence(result, f"No space left on the disk (or the quota is used up) while writing {tmp_path / 'run'}", "free some space")


def test_a_full_disk_while_writing_an_overlay_leaves_no_file(crop_checkpoint, tiny_tree, tmp_path, monkeypatch):
    def full_disk_write(self, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_bytes", full_disk_write)  # what the atomic writer writes the PNG with
    result = invoke("explain", tiny_tree / "blast" / "blast_01.png", "--checkpoint", crop_checkpoint, "--out", tmp_path / "o.png")
    one_sentence(result, f"while writing {tmp_path / 'o.png'}")
    assert list(tmp_path.iterdir()) == []  # neither the overlay nor its temporary file


@pytest.mark.parametrize("code, filename, out, phrase", [
    (errno.EROFS, "/mnt/ro/run", "/mnt/ro/run", "/mnt/ro/run is on a read-only file system: choose another --out on a writable disk."),
    (errno.EACCES, "/srv/run/best.pt", "/srv/run", "/srv/run/best.pt cannot be written (permission denied): choose another --out"),
    (errno.EISDIR, "/srv/o.png", None, "/srv/o.png is a folder where a file is needed"),
    (errno.EDQUOT, None, "runs/a", "while writing runs/a: free some space or choose another --out on another disk."),
])
def test_each_kind_of_unwritable_output_has_its_sentence(code, filename, out, phrase):
    assert phrase in _output_error(OSError(code, os.strerror(code), filename), out)


def test_other_os_errors_are_not_taken_for_output_errors():
    assert _output_error(OSError(errno.ECONNREFUSED, "refused"), None) is None
    assert _output_error(PermissionError(errno.EACCES, "denied"), None) is None  # no file named: not ours to explain


def _predict_csv(image: Path, checkpoint: Path, **popen) -> subprocess.Popen:
    env = {**os.environ, "LEUKODETECT_BACKEND": "torch"}
    return subprocess.Popen([sys.executable, "-m", "leukodetect", "predict", str(image), "--checkpoint", str(checkpoint), "--csv"],
                            stderr=subprocess.PIPE, text=True, env=env, **popen)


def test_predict_csv_to_a_full_disk_or_a_closed_pipe_is_one_sentence(crop_checkpoint, tiny_tree):
    """Standard output that cannot take the results: status 2 and a sentence, no traceback, no 'Exception ignored' at exit."""
    image = tiny_tree / "blast" / "blast_01.png"
    with open("/dev/full", "w") as full:  # every write: ENOSPC
        proc = _predict_csv(image, crop_checkpoint, stdout=full)
        _, stderr = proc.communicate(timeout=120)
    proc_closed = _predict_csv(image, crop_checkpoint, stdout=subprocess.PIPE)
    proc_closed.stdout.close()  # the reader is gone before the results are written
    closed_stderr = proc_closed.stderr.read()
    proc_closed.wait(timeout=120)
    for code, text in ((proc.returncode, stderr), (proc_closed.returncode, closed_stderr)):
        assert code == 2, text
        assert "Standard output could not take the results" in text and "Traceback" not in text and "Exception ignored" not in text
