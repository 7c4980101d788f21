"""Atomic writes that fail half way: the disk fills after part of the new file is written.

The oracle is the guarantee itself: the file at the path holds its old bytes exactly, no
temporary file is left beside it, and the error is one OSError naming the path (not the
temporary file) with its cause.
"""

from __future__ import annotations

import builtins
import errno
import io

import numpy as np
import pytest

from difflab import safe_io
from difflab.safe_io import atomic_output, atomic_write_bytes, atomic_write_json, atomic_write_text

OLD = b"old content that must survive\n"


class _DiskFillsHalfWay(io.FileIO):
    """A file whose first write stores half its bytes (really, on disk) and then raises ENOSPC,
    as a write that fills the disk does."""

    def write(self, data):  # type: ignore[override]
        data = bytes(data)
        super().write(data[: len(data) // 2])
        super().flush()
        raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture
def disk_fills_half_way(monkeypatch):
    """safe_io's open() for writing returns a file that fills the disk half way."""

    def fake_open(file, mode="r", *args, **kwargs):
        if "w" in mode:
            return _DiskFillsHalfWay(file, "w")
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(safe_io, "open", fake_open, raising=False)


def _check_old_file_kept(folder, path, err) -> None:
    assert path.read_bytes() == OLD
    assert sorted(p.name for p in folder.iterdir()) == [path.name]  # no temporary file left
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert err.filename == str(path) and "No space left on device" in safe_io.os_error_line(err)


@pytest.mark.parametrize(
    "write",
    [
        lambda p: atomic_write_bytes(p, b"new " * 1000),
        lambda p: atomic_write_text(p, "new text " * 1000),
        lambda p: atomic_write_json(p, {"new": list(range(500))}),
    ],
    ids=["bytes", "text", "json"],
)
def test_an_atomic_write_that_fills_the_disk_half_way_keeps_the_old_file(
    tmp_path, disk_fills_half_way, write
):
    """Bugs caught: writing the data straight to the path (the old file is then half new),
    or not removing the temporary file when the write fails (a full disk fills up further
    with every retry)."""
    path = tmp_path / "config.json"
    path.write_bytes(OLD)
    with pytest.raises(OSError) as e:
        write(path)
    _check_old_file_kept(tmp_path, path, e.value)


def test_the_partial_write_really_reached_the_disk(tmp_path, disk_fills_half_way):
    """The fake is not a no-op: the same write without the atomic rename leaves half a file."""
    path = tmp_path / "direct.bin"
    path.write_bytes(OLD)
    with pytest.raises(OSError):
        safe_io.write_file(path, b"x" * 100)
    assert path.read_bytes() == b"x" * 50


def test_atomic_output_whose_writer_fills_the_disk_half_way_keeps_the_old_file(tmp_path):
    """The same guarantee for writers that take a file name (np.savez, Image.save)."""
    path = tmp_path / "samples.npz"
    path.write_bytes(OLD)
    with pytest.raises(OSError) as e:
        with atomic_output(path) as tmp:
            np.savez(tmp, samples=np.zeros((10, 10)))
            with open(tmp, "r+b") as f:  # keep half of it, then the disk is full
                f.truncate(tmp.stat().st_size // 2)
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    _check_old_file_kept(tmp_path, path, e.value)
