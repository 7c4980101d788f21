"""Behaviour fingerprints: every preset, trained for 20 fixed-seed steps on tiny synthetic data,
gives the loss values and weights recorded in ``tests/data/fingerprints.json``.

A refactoring of how runs are built, trained or checkpointed must leave every fingerprint as it
was; a change of behaviour shows as a changed loss or weight hash, named by preset. Record them
again (after explaining the change in the commit) with

    PYTHONPATH=src python tests/test_fingerprints.py --write

The data is written here (MNIST-format IDX files, CIFAR-10 batches, an image folder), so nothing
needs a download; image presets train the ``tiny`` U-Net and autoencoder on 16 x 16 images.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

FILE = Path(__file__).resolve().parent / "data" / "fingerprints.json"
STEPS = 20
COMMON = ["train.batch_size=8", "train.log_every=1", "train.ckpt_every=100",
          "train.warmup_steps=5", "sample.n=4", "sample.steps=2", "sample.sampler=ddim",
          "sample.eta=none"]  # fmt: skip
TOY = ["model.hidden=16", "model.depth=2"]
IMAGE = ["data.image_size=16", "model.preset=tiny", "model.ae_preset=tiny", "data.limit=40"]


def _write_mnist(folder: Path) -> Path:
    """MNIST-format IDX files of 28 x 28 'digits': class k is a bar at rows 2k+3..2k+5."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 30, size=(n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k + 3 : 2 * k + 6, 4:24] = 255
        for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
            header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim)
            header += struct.pack(f">{arr.ndim}I", *arr.shape)
            blob = gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0)
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(blob)
    return folder


def _write_cifar(folder: Path) -> Path:
    """CIFAR-10 python batches of random images (8 per batch)."""
    rng = np.random.default_rng(0)
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True, exist_ok=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(8, 3072), dtype=np.uint8)
        batch = {b"labels": rng.integers(0, 10, size=8).tolist(), b"data": data}
        (batches / name).write_bytes(pickle.dumps(batch, protocol=5))
    return folder


def _write_folder(folder: Path) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _weights_hash(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the weights' values in registration order (names left out, so a renamed
    module with the same weights keeps its hash)."""
    h = hashlib.sha256()
    for t in tensors.values():
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _train(
    preset: str, root: Path, data: dict[str, Path], extra: list[str], name: str | None = None
) -> dict:
    from difflab import checkpoint as ckpt
    from difflab.app.cli import main
    from difflab.app.config import get_preset

    cfg = get_preset(preset)
    sets = list(COMMON)
    data_dir: Path | None = None
    if cfg.data.is_toy:
        sets += TOY
    else:
        sets += IMAGE
        if cfg.data.name in ("mnist", "fashion-mnist"):
            data_dir = data["mnist"]
        elif cfg.data.name == "cifar10":
            data_dir = data["cifar10"]
        else:  # folder, hf: an image folder
            data_dir = data["folder"]
            sets += ["data.name=folder", "data.channels=3"]
    sets += extra
    out = root / (name or preset)
    args = ["train", "--preset", preset, "--out", str(out), "--steps", str(STEPS),
            "--no-progress", "--device", "cpu", "--seed", "0"]  # fmt: skip
    if data_dir is not None:
        args += ["--data-dir", str(data_dir)]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 0, preset
    with open(out / "metrics.csv", newline="") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    c = ckpt.load_checkpoint(out)
    return {
        "losses": [float(f"{x:.6g}") for x in losses],
        "model": _weights_hash(c.tensors["model"]),
        "ema": _weights_hash(c.tensors["ema"]),
    }


# the distillation presets: their teachers (trained before them) and their own sampler
DISTILLED = {
    "swissroll-distill": lambda root: [f"distill.teacher={root / 'swissroll'}"],
    "mnist-consistency": lambda root: [
        f"distill.teacher={root / 'mnist-eps'}",
        "sample.sampler=consistency",
    ],  # fmt: skip
}


def compute(root: Path) -> dict[str, dict]:
    from difflab.app.config import PRESETS

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data = {
            "mnist": _write_mnist(root / "data" / "mnist"),
            "cifar10": _write_cifar(root / "data" / "cifar10"),
            "folder": _write_folder(root / "data" / "folder"),
        }
        out = {"mnist-ae": _train("mnist-ae", root, data, [])}
        for preset in PRESETS:
            if preset not in out:
                latent = "latent" in preset
                sets = [f"model.autoencoder={root / 'mnist-ae'}"] if latent else []
                sets += DISTILLED.get(preset, lambda r: [])(root)
                out[preset] = _train(preset, root, data, sets)
        # a cascade: the SR stage on a base run, whose EMA network it stores
        base = [f"model.base={root / 'mnist-14'}"]
        out["mnist-sr+base"] = _train("mnist-sr", root, data, base, name="mnist-sr+base")
        return out
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_every_preset_trains_as_recorded(tmp_path):
    recorded = json.loads(FILE.read_text(encoding="utf-8"))
    now = compute(tmp_path)
    assert sorted(now) == sorted(recorded), "presets added or removed: record them again"
    changed = [p for p in recorded if now[p] != recorded[p]]
    assert not changed, "fingerprints changed: " + ", ".join(
        f"{p}: {recorded[p]} -> {now[p]}" for p in changed
    )


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: PYTHONPATH=src python tests/test_fingerprints.py --write")
    with tempfile.TemporaryDirectory() as tmp:
        fingerprints = compute(Path(tmp))
    FILE.write_text(json.dumps(fingerprints, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    print(f"wrote {len(fingerprints)} fingerprints to {FILE}")
