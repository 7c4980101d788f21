"""Crash-safe files of a run: atomic replacement and an append-only metrics CSV.

:func:`atomic_write_bytes` (and its text and JSON forms) replaces a file so that a reader, or a
run resumed after a kill, sees the old or the new content, never a mix. :class:`MetricsLog`
appends flushed CSV rows and, on resume, drops rows logged after the checkpoint and a partial
last line left by a crash. :mod:`difflab.checkpoint` builds checkpoints on these.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "CheckpointError",
    "MetricsLog",
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_free_space",
    "check_writable",
    "fsync_dir",
    "gigabytes",
    "json_bytes",
    "one_line",
    "os_error_line",
    "progress_bar",
    "read_json_object",
    "read_metrics",
    "say",
    "UnbreakableStream",
    "write_file",
]


class CheckpointError(RuntimeError):
    """A run directory or checkpoint is missing, incomplete or corrupted (one-line message)."""


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# ----------------------------------------------------------------------------- printing
def _silence(stream: Any) -> None:
    """Point a broken stream's descriptor at /dev/null, so that later writes and the
    exit-time flush cannot fail either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def say(msg: str, *, err: bool = False) -> None:
    """Print one line to stdout (or stderr). A closed pipe (``difflab train | head -1``) never
    breaks a run: printing to it stops, the work goes on."""
    stream = sys.stderr if err else sys.stdout
    try:
        print(msg, file=stream, flush=True)
    except (OSError, ValueError):  # a closed pipe (EPIPE), or a closed stream (ValueError)
        _silence(stream)


class UnbreakableStream:
    """A text stream whose writes never raise: when the stream breaks (a closed pipe, as in
    ``difflab train 2>&1 | head -1``) it is pointed at /dev/null and the work goes on. Progress
    bars write to ``UnbreakableStream(sys.stderr)``, as :func:`say` prints."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):
            _silence(self._stream)
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except (OSError, ValueError):
            _silence(self._stream)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def progress_bar(**kwargs: Any) -> Any:
    """A ``tqdm`` progress bar on stderr that a closed stderr never breaks."""
    from tqdm import tqdm  # here: safe_io is imported by `difflab --help`

    return tqdm(file=UnbreakableStream(sys.stderr), dynamic_ncols=True, **kwargs)


# ----------------------------------------------------------------------------- atomic writes
def fsync_dir(path: str | os.PathLike) -> None:
    """fsync a directory (after a rename in it); a no-op where the filesystem cannot."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def os_error_line(err: OSError, path: str | os.PathLike | None = None) -> str:
    """One line for an OSError: the file it concerns and the cause (``No space left on device``)."""
    name = path if path is not None else err.filename
    cause = err.strerror or one_line(err)
    return f"{name}: {cause}" if name is not None else cause


def _naming(err: BaseException, path: str | os.PathLike) -> BaseException:
    """An OSError re-made to name ``path`` (not a temporary file); other errors unchanged."""
    if isinstance(err, OSError):
        return OSError(err.errno, err.strerror or one_line(err), str(path))
    return err


def write_file(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a new file at ``path``, flushed and fsynced (every byte a run writes goes
    through here, so a full disk or an I/O error is an ``OSError`` that names ``path``)."""
    try:
        with open(path, "wb") as f:
            os.fchmod(f.fileno(), 0o644)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise _naming(e, path) from e


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without an error, rename it
    over ``path`` (a reader, or a concurrent writer of the same file, sees the old or a new
    complete file, never a mix). On an error the temporary file is removed and ``path`` is left
    as it was. For writers that take a file name (``np.savez``, ``Image.save``, ``savefig``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(e, path) from e
    fsync_dir(path.parent)


def check_writable(path: str | os.PathLike) -> Path:
    """Make ``path``'s folder and check that a file can be created there, before long work.

    Raises:
        ValueError: ``path`` is an existing folder, or its folder cannot be made or written.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise ValueError(f"cannot write {path}: {os_error_line(e)}") from None
    return path


def gigabytes(nbytes: float) -> str:
    """``nbytes`` as a short figure in GB (decimal), for messages."""
    return f"{nbytes / 1e9:.3g} GB"


def check_free_space(path: str | os.PathLike, nbytes: float) -> None:
    """Refuse, before long work, an output of about ``nbytes`` that the disk holding ``path``
    (a file to be written; its nearest existing folder is measured) has no room for.

    Raises:
        ValueError: one line naming ``path``, the size needed and the space free.
    """
    folder = Path(os.path.abspath(path)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise ValueError(
            f"{path}: the output needs about {gigabytes(nbytes)}, its disk has "
            f"{gigabytes(free)} free; draw fewer samples or write elsewhere"
        )


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically: a reader sees the old or the new file, never a mix.

    Writes a temporary file in the same directory, flushes and fsyncs it, renames it over ``path``
    with ``os.replace`` and fsyncs the directory. The directory must exist.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write_file(tmp, data)
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        raise _naming(e, path) from e
    fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def json_bytes(obj: Any, what: str) -> bytes:
    """Indented UTF-8 JSON of obj; a TypeError naming ``what`` if it is not serialisable."""
    try:
        return (json.dumps(obj, indent=2) + "\n").encode("utf-8")
    except (TypeError, ValueError) as e:
        raise TypeError(f"cannot write {what} as JSON: {one_line(e)}") from e


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """:func:`atomic_write_bytes` for a JSON document (indented, UTF-8)."""
    atomic_write_bytes(path, json_bytes(obj, str(path)))


def read_json_object(
    path: Path, *, missing: str, invalid: str, error: type[Exception] = CheckpointError
) -> dict[str, Any]:
    """The JSON object in the UTF-8 file ``path``. A one-line ``error`` names the file:
    ``"PATH: {missing}"`` when it does not exist, ``"PATH: {invalid} (cause)"`` when it cannot
    be read or parsed, ``"PATH: expected a JSON object, got TYPE"`` for another JSON value."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: {invalid} ({one_line(e)})") from e
    if not isinstance(obj, dict):
        raise error(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------- metrics
def _decode_csv(raw: bytes, path: Path) -> str:
    """UTF-8 text of a CSV file with a BOM dropped and CRLF/CR line ends made LF."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise CheckpointError(
            f"{path}: not UTF-8 text ({one_line(e)}); repair or remove the file"
        ) from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _complete_lines(text: str) -> list[str]:
    """Lines of a file that end in a newline (a crash may leave a partial last line)."""
    return [line + "\n" for line in text.split("\n")[:-1]]


class MetricsLog:
    """Append rows to a CSV file: header written once, each row flushed.

    With ``resume_step``, rows with ``step > resume_step`` (logged after the checkpoint a run
    resumes from) are removed first, so a resumed run has no duplicate steps. A partial last
    line left by a crash is removed too. Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fieldnames: Sequence[str],
        *,
        resume_step: int | None = None,
    ) -> None:
        self.path = Path(path)
        self.fieldnames = list(fieldnames)
        if not self.fieldnames or len(set(self.fieldnames)) != len(self.fieldnames):
            raise ValueError(f"fieldnames must be non-empty and unique, got {self.fieldnames}")
        if resume_step is not None and "step" not in self.fieldnames:
            raise ValueError("resume_step needs a 'step' column in fieldnames")
        self._repair(resume_step)
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self.fieldnames, lineterminator="\n")
        if self._file.tell() == 0:
            try:
                self._writer.writeheader()
                self._file.flush()
            except OSError as e:
                with contextlib.suppress(OSError):  # closing flushes the header again
                    self._file.close()
                raise _naming(e, self.path) from e

    def _repair(self, resume_step: int | None) -> None:
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        text = _decode_csv(raw, self.path)
        lines = _complete_lines(text)
        if lines:
            header = next(csv.reader([lines[0]]))
            if header != self.fieldnames:
                raise CheckpointError(
                    f"{self.path}: columns {header} differ from the expected {self.fieldnames}"
                )
        if resume_step is not None and lines:
            col = self.fieldnames.index("step")
            kept = lines[:1]
            for line in lines[1:]:
                row = next(csv.reader([line]))
                try:
                    if float(row[col]) <= resume_step:
                        kept.append(line)
                except (IndexError, ValueError):
                    continue
            lines = kept
        if "".join(lines).encode("utf-8") != raw:  # also drops a BOM and CRLF line ends
            atomic_write_text(self.path, "".join(lines))

    def append(self, row: Mapping[str, Any] | None = None, **values: Any) -> None:
        """Write one row (missing columns are left empty) and flush it."""
        row = {**(row or {}), **values}
        unknown = set(row) - set(self.fieldnames)
        if unknown:
            raise ValueError(f"unknown metrics {sorted(unknown)}; columns are {self.fieldnames}")
        try:
            self._writer.writerow(row)
            self._file.flush()
        except OSError as e:
            raise _naming(e, self.path) from e

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | os.PathLike) -> dict[str, list[float]]:
    """Columns of a metrics CSV as float lists (empty or non-numeric cells become NaN)."""
    path = Path(path)
    try:
        text = _decode_csv(path.read_bytes(), path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: metrics file not found") from None
    lines = _complete_lines(text)
    if not lines:
        return {}
    reader = csv.reader(lines)
    header = next(reader)
    columns: dict[str, list[float]] = {name: [] for name in header}
    for row in reader:
        for i, name in enumerate(header):
            try:
                columns[name].append(float(row[i]))
            except (IndexError, ValueError):
                columns[name].append(math.nan)
    return columns
