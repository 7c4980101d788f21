"""Run directories and crash-safe checkpoints.

Layout of a run directory::

    RUN_DIR/config.json                  app config (JSON object), written atomically at run start
    RUN_DIR/checkpoints/step-00001000/   one complete checkpoint:
        <group>.safetensors                  named tensor groups (model, ema, ...); no pickle
        state.pt                             optimizer state, step, RNG states, read back with
                                             torch.load(weights_only=True)
        manifest.json                        file names, sizes, SHA-256, step, format version
    RUN_DIR/checkpoints/latest           names the newest complete checkpoint
    RUN_DIR/metrics.csv                  one row per logged step
    RUN_DIR/finished.json                written when the run completed

A checkpoint is written into ``checkpoints/.tmp-step-XXXXXXXX-*/``; every file and the directory
are fsynced, the directory is renamed to ``step-XXXXXXXX`` (atomic on POSIX), only then is
``latest`` replaced atomically, and only after that are older checkpoints removed. A process
killed at any moment therefore leaves the previous (or the new) checkpoint complete, and
:func:`load_checkpoint` finds it even when ``latest`` is missing or dangling. One process writes
to a run directory at a time: :class:`RunLock` holds ``RUN_DIR/.lock`` while it writes.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import io
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no locking
    fcntl = None  # type: ignore[assignment]

from difflab.safe_io import (  # noqa: F401  (re-exported: the run-directory API)
    CheckpointError,
    MetricsLog,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    fsync_dir,
    json_bytes,
    one_line,
    read_json_object,
    read_metrics,
    write_file,
)

FORMAT_VERSION = 1
_STEP_DIR = re.compile(r"step-(\d+)")
_OLD_STEP_DIR = re.compile(r"\.old-step-(\d+)-[0-9a-f]+")
_GROUP_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]*")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_CHUNK = 1 << 20
_STATE_SCALARS = (bool, int, float, complex, str, bytes, type(None), torch.dtype, torch.device)


# ----------------------------------------------------------------------------- saving
def _checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _sync_and_hash(path: Path) -> dict[str, Any]:
    """fsync a written file and return its manifest entry (size, SHA-256)."""
    h = hashlib.sha256()
    size = 0
    with open(path, "r+b") as f:
        os.fsync(f.fileno())
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _plain_tensors(group: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that own their storage (safetensors refuses shared storage)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings; group {group!r} has {name!r}")
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            raise TypeError(f"tensors[{group!r}][{name!r}] is not a dense torch.Tensor")
        t = t.detach()
        if t.device.type != "cpu":
            t = t.to("cpu", memory_format=torch.contiguous_format)
        else:
            storage = t.untyped_storage()
            if (
                storage.data_ptr() in seen
                or not t.is_contiguous()
                or storage.nbytes() != t.numel() * t.element_size()
            ):
                t = t.clone(memory_format=torch.contiguous_format)
            seen.add(storage.data_ptr())
        out[name] = t
    return out


def _check_state(obj: Any, where: str) -> None:
    """Refuse at save time what ``torch.load(weights_only=True)`` would refuse at load time."""
    kind = type(obj)
    if isinstance(obj, torch.Tensor) or kind in _STATE_SCALARS or kind is torch.Size:
        return
    if kind in (dict, collections.OrderedDict):
        for key, value in obj.items():
            _check_state(key, f"{where} key {key!r}")
            _check_state(value, f"{where}[{key!r}]")
        return
    if kind in (list, tuple, set):
        for i, value in enumerate(obj):
            _check_state(value, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where} has type {kind.__module__}.{kind.__qualname__}, which "
        "torch.load(weights_only=True) cannot read; use tensors, numbers, strings, lists, dicts"
    )


def first_non_finite(obj: Any, where: str = "") -> str | None:
    """The name (``[group][key]...``) of the first floating-point tensor in a nested state
    (dicts, lists, tuples) that holds a NaN or an infinity, or None when all are finite.
    Training refuses to save such a state: weights, EMA and optimizer moments alike."""
    named: list[tuple[str, torch.Tensor]] = []

    def walk(o: Any, name: str) -> None:
        if isinstance(o, torch.Tensor):
            if o.is_floating_point() or o.is_complex():
                named.append((name, o))
        elif isinstance(o, Mapping):
            for k, v in o.items():
                walk(v, f"{name}[{k!r}]")
        elif isinstance(o, (list, tuple)):
            for i, v in enumerate(o):
                walk(v, f"{name}[{i}]")

    walk(obj, where)
    if not named:
        return None
    finite = torch.stack([torch.isfinite(t).all().cpu() for _, t in named])  # one host sync
    bad = (~finite).nonzero()
    return named[int(bad[0])][0] if len(bad) else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    state: Mapping[str, Any],
    keep: int | None = 2,
) -> Path:
    """Write ``RUN_DIR/checkpoints/step-XXXXXXXX/`` completely, point ``latest`` at it, prune.

    Args:
        run_dir: the run directory (``checkpoints/`` is created inside it).
        step: training step (>= 0); names the checkpoint. Saving a step that already exists
            replaces it without a moment where no complete copy of it exists.
        tensors: named tensor groups, e.g. ``{"model": model.state_dict(), "ema": ...}``; each
            is written to ``<group>.safetensors`` (moved to CPU, made contiguous, shared storage
            cloned). Group names: letters, digits, ``_``, ``-``.
        state: anything ``torch.load(weights_only=True)`` reads (tensors, dicts, lists, tuples,
            numbers, strings, None): optimizer state, step, RNG states. Numpy objects are refused.
        keep: number of checkpoints to keep, counting the new one and ordering the others by
            step (None keeps all). Older ones are removed only after ``latest`` names the new one.

    Returns:
        The path of the new checkpoint directory.
    """
    if type(step) is not int or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if keep is not None and (type(keep) is not int or keep < 1):
        raise ValueError(f"keep must be an int >= 1 or None, got {keep!r}")
    for group in tensors:
        if not isinstance(group, str) or not _GROUP_NAME.fullmatch(group):
            raise ValueError(f"tensor group name {group!r} must match {_GROUP_NAME.pattern}")
    if not isinstance(state, Mapping):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    _check_state(dict(state), "state")

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = _checkpoint_name(step)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root))
    old: Path | None = None
    try:
        tmp.chmod(0o755)
        files: dict[str, dict[str, Any]] = {}
        # serialised in memory, then written by write_file: a full disk is an OSError naming
        # the file, whichever serialiser made the bytes
        for group, group_tensors in tensors.items():
            fname = f"{group}.safetensors"
            write_file(tmp / fname, safetensors_bytes(_plain_tensors(group, group_tensors)))
            files[fname] = _sync_and_hash(tmp / fname)
        buffer = io.BytesIO()
        torch.save(dict(state), buffer)
        write_file(tmp / "state.pt", buffer.getvalue())
        files["state.pt"] = _sync_and_hash(tmp / "state.pt")
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "tensor_groups": list(tensors),
            "files": files,
        }
        write_file(tmp / "manifest.json", json_bytes(manifest, "manifest"))
        fsync_dir(tmp)
        if final.exists():  # re-saving a step: keep the old copy until the new one is in place
            old = root / f".old-{name}-{secrets.token_hex(4)}"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.rename(old, final)
        raise
    atomic_write_text(root / "latest", name + "\n")
    _prune(root, keep=keep, current=name)
    return final


def _prune(root: Path, *, keep: int | None, current: str) -> None:
    """Remove leftovers of interrupted saves and all but ``keep`` checkpoints."""
    for p in root.iterdir():
        if p.name.startswith((".tmp-", ".old-", ".trash-")) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(".latest.") and p.name.endswith(".tmp") and p.is_file():
            p.unlink(missing_ok=True)  # left by an interrupted atomic_write_text
    if keep is None:
        return
    others = sorted(
        (int(m.group(1)), p)
        for p in root.iterdir()
        if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir() and p.name != current
    )
    for _, p in others[: max(len(others) - (keep - 1), 0)]:
        trash = root / f".trash-{p.name}-{secrets.token_hex(4)}"
        os.rename(p, trash)  # a half-deleted directory never looks like a checkpoint
        shutil.rmtree(trash, ignore_errors=True)


# ----------------------------------------------------------------------------- loading
@dataclass
class Checkpoint:
    """A loaded checkpoint: ``tensors[group][name]`` and the ``state`` dict given to save."""

    step: int
    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]
    skipped: list[str] = field(default_factory=list)  # why newer checkpoints were not used

    def fallback_note(self) -> str | None:
        """One line saying which newer checkpoint was skipped and why, or None."""
        if not self.skipped:
            return None
        return f"{self.skipped[0]}; using {self.path.name}"

    def check_finite(self, group: str) -> None:
        """Raise :class:`CheckpointError` if a weight of ``group`` is NaN or infinite."""
        bad = [
            k
            for k, t in self.tensors[group].items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())
        ]
        if bad:
            raise CheckpointError(
                f"{self.path}: the {group} weights are not finite ({bad[0]}); the run diverged "
                "before this checkpoint was written"
            )


def _read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / "manifest.json"
    manifest = read_json_object(
        path, missing="manifest missing (incomplete checkpoint)", invalid="unreadable manifest"
    )

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{path}: unreadable manifest ({what})")

    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise bad("missing or invalid format_version")
    if version > FORMAT_VERSION:
        raise bad(f"format_version {version} is newer than this difflab ({FORMAT_VERSION})")
    if type(manifest.get("step")) is not int:
        raise bad("missing or invalid step")
    files, groups = manifest.get("files"), manifest.get("tensor_groups")
    if not isinstance(files, dict) or "state.pt" not in files:
        raise bad("missing or invalid files")
    for fname, info in files.items():
        if (
            not _FILE_NAME.fullmatch(fname)
            or not isinstance(info, dict)
            or type(info.get("size")) is not int
            or not isinstance(info.get("sha256"), str)
        ):
            raise bad(f"invalid entry for file {fname!r}")
    if not isinstance(groups, list) or any(f"{g}.safetensors" not in files for g in groups):
        raise bad("missing or invalid tensor_groups")
    return manifest


def verify_checkpoint(ckpt_dir: str | os.PathLike) -> dict[str, Any]:
    """Check every file of a checkpoint against its manifest (size, SHA-256); return the manifest.

    Raises:
        CheckpointError: naming the file that is missing, truncated or corrupted.
    """
    ckpt_dir = Path(ckpt_dir)
    manifest = _read_manifest(ckpt_dir)
    for fname, info in manifest["files"].items():
        path = ckpt_dir / fname
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{path}: file missing (incomplete checkpoint)") from None
        if size != info["size"]:
            raise CheckpointError(
                f"{path}: {size} bytes but the manifest records {info['size']} (truncated file)"
            )
        if _sha256(path) != info["sha256"]:
            raise CheckpointError(f"{path}: SHA-256 differs from the manifest (corrupted file)")
    return manifest


def _checkpoints_root(path: Path) -> Path:
    return path / "checkpoints" if (path / "checkpoints").is_dir() else path


def _candidates(root: Path) -> list[Path]:
    """Checkpoint directories, the one ``latest`` names first, then newest step first."""
    try:
        name = (root / "latest").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        name = ""
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.fullmatch(p.name) or _OLD_STEP_DIR.fullmatch(p.name)
            if m and p.is_dir():
                found.append((p.name == name, int(m.group(1)), not p.name.startswith("."), p))
    return [p for *_, p in sorted(found, key=lambda c: c[:3], reverse=True)]


def _resolve(run_dir: Path) -> tuple[Path | None, dict[str, Any] | None, list[str]]:
    """The newest checkpoint that verifies, its manifest, and why each newer one was skipped."""
    skipped: list[str] = []
    for p in _candidates(_checkpoints_root(run_dir)):
        try:
            return p, verify_checkpoint(p), skipped
        except CheckpointError as e:
            skipped.append(str(e))
    return None, None, skipped


def has_checkpoints(run_dir: str | os.PathLike) -> bool:
    """Whether ``run_dir`` holds any checkpoint directory, complete or not (a run that has none
    was stopped before its first checkpoint; one whose checkpoints all fail to verify is
    damaged, which :func:`load_checkpoint` reports)."""
    return bool(_candidates(_checkpoints_root(Path(run_dir))))


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint directory :func:`load_checkpoint` would load from ``run_dir``, or None:
    the newest one (``checkpoints/latest`` first) that passes verification."""
    run_dir = Path(run_dir)
    return _resolve(run_dir)[0] if run_dir.is_dir() else None


def load_checkpoint(
    path: str | os.PathLike, *, map_location: str | torch.device = "cpu"
) -> Checkpoint:
    """Load a checkpoint from a run directory (following ``latest``) or a checkpoint directory.

    Every file is verified against the manifest first; ``state.pt`` is read with
    ``torch.load(weights_only=True)``.

    Raises:
        CheckpointError: no checkpoint at all, unreadable manifest, missing, truncated or
            corrupted file (the message names the file).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run directory or checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a run directory or checkpoint directory")
    skipped: list[str] = []
    if (path / "manifest.json").exists() or _STEP_DIR.fullmatch(path.name):
        ckpt_dir, manifest = path, verify_checkpoint(path)
    else:
        found, manifest, skipped = _resolve(path)
        if found is None or manifest is None:
            raise CheckpointError(
                f"{path}: no complete checkpoint found"
                + (f" (skipped {skipped[0]})" if skipped else "")
            )
        ckpt_dir = found
    device = str(torch.device(map_location))
    tensors = {}
    for group in manifest["tensor_groups"]:
        file = ckpt_dir / f"{group}.safetensors"
        try:
            tensors[group] = load_file(file, device=device)
        except Exception as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({one_line(e)})") from e
    file = ckpt_dir / "state.pt"
    try:
        state = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{file}: torch.load(weights_only=True) failed ({one_line(e)})"
        ) from e
    return Checkpoint(manifest["step"], ckpt_dir, tensors, state, skipped)


# ----------------------------------------------------------------------------- run directories
def read_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``RUN_DIR/config.json`` (a JSON object)."""
    if is_unstarted_run_dir(run_dir):
        raise CheckpointError(
            f"{run_dir}: the run never started (it was stopped before its config.json was "
            f"written); start it again with --out {run_dir}"
        )
    return read_json_object(
        Path(run_dir) / "config.json",
        missing="not found (not a difflab run directory?)",
        invalid="invalid JSON",
    )


def is_finished(run_dir: str | os.PathLike) -> bool:
    """Whether ``RUN_DIR/finished.json`` exists."""
    return (Path(run_dir) / "finished.json").is_file()


def mark_finished(run_dir: str | os.PathLike, info: Mapping[str, Any]) -> None:
    """Write ``RUN_DIR/finished.json`` (e.g. final step, wall time) atomically."""
    atomic_write_json(Path(run_dir) / "finished.json", dict(info))


def prepare_run_dir(
    run_dir: str | os.PathLike, *, config: Mapping[str, Any] | None = None, resume: bool
) -> None:
    """Create a new run directory holding ``config.json``, or check that one can be resumed.

    New run (``resume=False``): ``run_dir`` must not exist or be empty; ``config`` is written
    atomically. Resume: ``run_dir`` must hold ``config.json``; nothing is written and ``config``
    is ignored (the stored config is authoritative: read it with :func:`read_config`).
    Existing files are never modified when an error is raised.
    """
    run_dir = Path(run_dir)
    if resume:
        if not run_dir.is_dir():
            raise CheckpointError(f"{run_dir}: cannot resume, no such run directory")
        if not (run_dir / "config.json").is_file():
            raise CheckpointError(f"{run_dir}: cannot resume, it holds no config.json")
        return
    if config is None:
        raise ValueError("prepare_run_dir needs config= for a new run")
    payload = json_bytes(dict(config), "config")
    _check_new_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(run_dir / "config.json", payload)
    for stale in run_dir.glob(".config.json.*.tmp"):  # of a run stopped before it started
        stale.unlink(missing_ok=True)


def _check_new_run_dir(run_dir: Path) -> None:
    """A new run may go into ``run_dir`` only if it is absent or empty (but for its lock)."""
    if not is_run_dir(run_dir):  # an existing run gets the messages below
        check_output(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is not a directory; use a new --out directory")
    if is_finished(run_dir):
        raise CheckpointError(f"{run_dir} already holds a finished run; use a new --out directory")
    if (run_dir / "config.json").exists() or (run_dir / "checkpoints").exists():
        raise CheckpointError(
            f"{run_dir} holds an unfinished run; pass --resume to continue it "
            "or use a new --out directory"
        )
    if not all(_is_start_file(p.name) for p in run_dir.iterdir()):
        raise CheckpointError(f"{run_dir} is not empty; use a new or empty --out directory")


def _is_start_file(name: str) -> bool:
    """The lock, or a temporary copy of the first ``config.json`` of a run stopped before
    its rename: what a run leaves before it has started."""
    return name == LOCK_NAME or re.fullmatch(r"\.config\.json\..+\.tmp", name) is not None


def is_unstarted_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds a run's lock and nothing else but temporary copies of its first
    ``config.json``: a run stopped before it started, which a new run may take over."""
    path = Path(path)
    if not (path / LOCK_NAME).is_file():
        return False
    return all(_is_start_file(p.name) for p in path.iterdir())


LOCK_NAME = ".lock"
RUN_STATE_FILES = ("config.json", "finished.json", "metrics.csv", LOCK_NAME)


def is_run_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a difflab run directory: ``config.json`` beside checkpoints, a lock
    or ``finished.json`` (a diffusers folder has a config.json but none of these)."""
    path = Path(path)
    return (path / "config.json").is_file() and (
        (path / "checkpoints").is_dir()
        or (path / "finished.json").is_file()
        or (path / LOCK_NAME).exists()
    )


def check_output(
    path: str | os.PathLike,
    *,
    data_dirs: tuple[str | os.PathLike, ...] = (),
    replace_export: bool = False,
) -> Path:
    """Refuse (one-line ``ValueError``) an output that would land on a run or its data.

    Every command that writes a file or folder calls this on each path it will write, before
    any work: the path may not be a run directory, a file of one (``config.json``, metrics,
    any file it already holds) or anything below its folders (``checkpoints/``, ``tb/``), nor
    lie in one of ``data_dirs``. A new file directly in a run directory (``samples-*.npz``)
    is fine. ``replace_export=True`` (``export --overwrite``) lets an existing folder be
    replaced only if it is an export (it holds ``model_index.json``).
    """
    path = Path(path)
    real = Path(os.path.realpath(path))
    if is_run_dir(real):
        raise ValueError(f"{path} is a run directory; write the output elsewhere")
    for parent in real.parents:
        if not is_run_dir(parent):
            continue
        if parent != real.parent:
            inner = real.relative_to(parent).parts[0]
            raise ValueError(
                f"{path} is inside the {inner}/ folder of the run directory {parent}; "
                "write the output elsewhere"
            )
        if real.name in RUN_STATE_FILES or real.exists():
            raise ValueError(
                f"{path} is a file of the run directory {parent}; write the output to a new "
                "file name or elsewhere"
            )
    for data in data_dirs:
        data = Path(os.path.realpath(data))
        if real == data or data in real.parents:
            raise ValueError(f"{path} is in the data directory {data}; write the output elsewhere")
    if replace_export and real.exists() and not (real / "model_index.json").is_file():
        raise ValueError(
            f"{path} is not an exported folder (no model_index.json); --overwrite replaces only "
            "a folder written by difflab export"
        )
    return path


class RunLock:
    """The one writer of a run directory: an exclusive ``flock`` on ``RUN_DIR/.lock``.

    The operating system releases it when the process ends, also on ``kill -9``, so a stale
    lock never blocks a resume. The file holds the PID of the holder, for the error message.
    """

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self._file: Any = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise :class:`CheckpointError` naming the PID that holds it."""
        f = open(self.path, "a+", encoding="utf-8")
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                pid = f.read().strip() or "unknown"
                f.close()
                raise CheckpointError(
                    f"{self.path.parent} is in use by another difflab process (PID {pid}); "
                    "wait for it to end or stop it first"
                ) from None
        try:  # a disk full from the start fails here first: name the file
            self._write_pid(f)
        except OSError as e:
            with contextlib.suppress(OSError):  # closing flushes the unwritten PID again
                f.close()
            raise OSError(e.errno, e.strerror or one_line(e), str(self.path)) from e
        self._file = f
        return self

    @staticmethod
    def _write_pid(f: Any) -> None:
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunLock:
        return self if self._file is not None else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def open_run_dir(run_dir: str | os.PathLike, *, config: Mapping[str, Any], resume: bool) -> RunLock:
    """Lock ``run_dir`` for this process, then create it (new run) or check it (resume) as
    :func:`prepare_run_dir` does; the caller releases the returned lock when it is done."""
    run_dir = Path(run_dir)
    if resume:
        prepare_run_dir(run_dir, resume=True)
    else:
        json_bytes(dict(config), "config")  # refuse a bad config before making anything
        _check_new_run_dir(run_dir)  # read-only: a refused directory is not touched
        run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    try:
        if not resume:
            prepare_run_dir(run_dir, config=config, resume=False)
    except BaseException:
        lock.release()
        raise
    return lock


def check_fits(module: torch.nn.Module, weights: Mapping[str, torch.Tensor], source: str) -> None:
    """A one-line ``CheckpointError`` naming ``source`` unless ``weights`` has exactly the names
    and shapes of ``module``'s state dict."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        what = (
            f"missing {missing[0]!r} and {len(missing) - 1} more" if missing
            else f"unexpected {unexpected[0]!r}" if unexpected
            else f"{wrong[0]!r} has shape {tuple(weights[wrong[0]].shape)}, "
            f"the network needs {tuple(expected[wrong[0]].shape)}"
        )  # fmt: skip
        raise CheckpointError(f"{source}: its weights do not fit this run's network ({what})")
