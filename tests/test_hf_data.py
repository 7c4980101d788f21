"""The hf image source: Hugging Face data sets built here with Dataset.from_dict and save_to_disk.

The oracles: the source images themselves (pixels read back exactly when no resize is asked
for), and the image-folder loader on the same images saved as PNG files (the resize and crop
must be the same function, so the pixels must be equal, not close).
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.app.build import cfg_data_shape, make_batch_fn
from difflab.app.cli import main
from difflab.app.config import apply_overrides, get_preset
from difflab.app.runs import build, check_config
from difflab.data.hf import HFSource, parse_hf_source, resolve_data_dir
from difflab.data.images import load_image_dataset, to_unit_range

datasets = pytest.importorskip("datasets")

NAMES = ["cat", "dog", "owl"]
# odd, wide and tall sizes: the centre crop's offsets and the shorter-side rule both matter
SIZES = [(20, 12), (12, 20), (16, 16), (21, 15), (9, 30)]


def _pictures(seed: int, sizes=SIZES) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    # smooth ramps plus noise, so that a flip, a transpose or a shifted crop changes pixels
    out = []
    for w, h in sizes:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 // w, yy * 255 // h, (xx + yy) * 127 // (w + h)], -1)
        noise = rng.integers(0, 40, size=(h, w, 3))
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB"))
    return out


def _features(**extra) -> datasets.Features:
    return datasets.Features(
        {"caption": datasets.Value("string"), "img": datasets.Image(), **extra}
    )


def _dataset(pictures, labels=None, **columns) -> datasets.Dataset:
    data = {"caption": [f"picture {i}" for i in range(len(pictures))], "img": pictures}
    extra = {k: datasets.Image() for k in columns}
    data.update(columns)
    if labels is not None:
        extra["label"] = datasets.ClassLabel(names=NAMES)
        data["label"] = labels
    return datasets.Dataset.from_dict(data, features=_features(**extra))


def _as_png_folder(pictures, folder):
    folder.mkdir(parents=True)
    for i, p in enumerate(pictures):
        p.save(folder / f"{i:03d}.png")
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A labelled Dataset folder, a DatasetDict folder (train/test) and their pictures."""
    root = tmp_path_factory.mktemp("hf")
    train, test = _pictures(0), _pictures(1, SIZES[:3])
    _dataset(train, labels=[0, 2, 1, 2, 0], mask=_pictures(2)).save_to_disk(root / "single")
    dd = datasets.DatasetDict({"train": _dataset(train, [0, 2, 1, 2, 0]), "test": _dataset(test)})
    dd.save_to_disk(root / "dict")
    return {"root": root, "train": train, "test": test}


# ----------------------------------------------------------------------------- pixels, labels
def test_pixels_equal_the_source_images_when_not_resized(tmp_path):
    pictures = _pictures(3, [(7, 5)] * 4)
    _dataset(pictures).save_to_disk(tmp_path / "ds")
    ds = load_image_dataset("hf", data_dir=tmp_path / "ds")
    expected = torch.from_numpy(np.stack([np.asarray(p) for p in pictures])).permute(0, 3, 1, 2)
    assert torch.equal(ds.images, expected)  # (N, C, H, W), rows in order, RGB not BGR
    assert ds.labels.tolist() == [-1] * 4 and ds.num_classes == 0  # unlabelled, as folders
    assert ds.hflip  # photographs flip by default, as folders


@pytest.mark.parametrize("channels", [3, 1])
def test_resize_and_crop_equal_the_image_folder_loader(saved, tmp_path, channels):
    folder = _as_png_folder(saved["train"], tmp_path / "png")
    ours = load_image_dataset(
        "hf", data_dir=saved["root"] / "single", image_size=8, channels=channels
    )
    oracle = load_image_dataset("folder", data_dir=folder, image_size=8, channels=channels)
    assert ours.images.shape == (5, channels, 8, 8)
    assert torch.equal(ours.images, oracle.images)


def test_labels_and_class_names_come_from_the_class_label_column(saved):
    ds = load_image_dataset("hf", data_dir=saved["root"] / "single", image_size=8)
    assert ds.labels.tolist() == [0, 2, 1, 2, 0]
    assert ds.num_classes == 3 and ds.class_names == tuple(NAMES)
    x, y = ds.batch([1, 2])
    assert x.shape == (2, 3, 8, 8) and y.tolist() == [2, 1]


def test_the_image_column_is_found_or_named(saved):
    single = saved["root"] / "single"
    found = load_image_dataset("hf", data_dir=single, image_size=8)
    named = load_image_dataset("hf", data_dir=single, image_size=8, image_column="mask")
    img = load_image_dataset("hf", data_dir=single, image_size=8, image_column="img")
    assert torch.equal(found.images, img.images)  # "img" is the first Image feature
    assert not torch.equal(named.images, img.images)
    mask = _pictures(2)[0].resize((13, 8), Image.Resampling.BICUBIC).crop((2, 0, 10, 8))
    assert torch.equal(named.images[0], torch.from_numpy(np.array(mask)).permute(2, 0, 1))


def test_splits_of_a_dataset_dict(saved):
    d = saved["root"] / "dict"
    train = load_image_dataset("hf", data_dir=d, image_size=8)
    held_out = load_image_dataset("hf", data_dir=d, image_size=8, train=False)
    named = load_image_dataset("hf", data_dir=f"{d}:test", image_size=8)
    assert len(train) == 5 and train.labels.tolist() == [0, 2, 1, 2, 0]
    assert len(held_out) == 3 and held_out.num_classes == 0  # the test split is unlabelled
    assert torch.equal(named.images, held_out.images)
    oracle = load_image_dataset(
        "folder", data_dir=_as_png_folder(saved["test"], saved["root"] / "test_png"), image_size=8
    )
    assert torch.equal(named.images, oracle.images)


def test_an_unreadable_row_is_skipped_and_the_labels_stay_aligned(tmp_path):
    pictures = _pictures(4, [(6, 6)] * 3)
    rows = [pictures[0], {"bytes": b"not an image", "path": None}, pictures[1], pictures[2]]
    _dataset(rows, labels=[0, 1, 2, 1]).save_to_disk(tmp_path / "ds")
    with pytest.warns(UserWarning, match="skipping unreadable image .*row 1") as record:
        ds = load_image_dataset("hf", data_dir=tmp_path / "ds")
    assert record[0].filename == __file__  # the warning points at the caller
    assert ds.labels.tolist() == [0, 2, 1]
    assert torch.equal(ds.images[1], torch.from_numpy(np.array(pictures[1])).permute(2, 0, 1))
    with pytest.raises(OSError, match="cannot read image .*row 1"):
        load_image_dataset("hf", data_dir=tmp_path / "ds", on_error="raise")


def test_hub_sources_call_load_dataset_with_the_split(saved, monkeypatch):
    calls = []
    local = datasets.load_from_disk(str(saved["root"] / "dict"))

    def fake_load_dataset(name, split=None):
        calls.append((name, split))
        return local if split is None else local[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    test = load_image_dataset("hf", data_dir="hf:someone/pictures:test", image_size=8)
    train = load_image_dataset("hf", data_dir="hf:someone/pictures", image_size=8)
    assert calls == [("someone/pictures", "test"), ("someone/pictures", None)]
    assert len(test) == 3 and len(train) == 5


def test_source_specs_parse_and_resolve(saved, tmp_path, monkeypatch):
    d = saved["root"] / "dict"
    assert parse_hf_source("hf:a/b") == HFSource(True, "a/b", None)
    assert parse_hf_source("hf:a/b:test") == HFSource(True, "a/b", "test")
    assert parse_hf_source(f"{d}:test") == HFSource(False, str(d), "test")
    odd = tmp_path / "x:y"  # a folder whose name holds a colon is taken whole
    odd.mkdir()
    assert parse_hf_source(str(odd)) == HFSource(False, str(odd), None)
    monkeypatch.chdir(saved["root"])
    assert resolve_data_dir("hf:a/b:test") == "hf:a/b:test"  # a hub name is not a path
    assert resolve_data_dir("dict:test") == f"{d.resolve()}:test"


# ----------------------------------------------------------------------------- errors
def test_errors_are_one_line_and_name_the_source(saved, tmp_path):
    def error(exc, **kwargs):
        with pytest.raises(exc) as info:
            load_image_dataset("hf", **kwargs)
        assert "\n" not in str(info.value)
        return str(info.value)

    assert "does not exist" in error(FileNotFoundError, data_dir=tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    assert "not a data set written by save_to_disk" in error(
        ValueError, data_dir=tmp_path / "empty"
    )
    datasets.Dataset.from_dict({"caption": ["a", "b"]}).save_to_disk(tmp_path / "text")
    msg = error(ValueError, data_dir=tmp_path / "text")
    assert "no image column" in msg and "caption (Value)" in msg
    single = saved["root"] / "single"
    assert "no column 'pic'" in error(ValueError, data_dir=single, image_column="pic")
    assert "is a Value" in error(ValueError, data_dir=single, image_column="caption")
    d = saved["root"] / "dict"
    assert "splits: train, test" in error(ValueError, data_dir=f"{d}:valid")
    assert "without splits" in error(ValueError, data_dir=f"{single}:train")
    assert "hf:NAME:SPLIT" in error(ValueError, data_dir="hf:a:b:c")


def test_a_missing_datasets_package_names_the_extra(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now fails
    with pytest.raises(ValueError, match=r"pip install 'difflab\[hf\]'"):
        load_image_dataset("hf", data_dir=saved["root"] / "single")


# ----------------------------------------------------------------------------- command line
FAST = [
    "--no-progress", "--steps", "3",
    "--set", "data.name=hf", "--set", "data.image_size=16", "--set", "data.channels=1",
    "--set", "model.preset=tiny-ddpm", "--set", "train.batch_size=4",
    "--set", "train.log_every=1", "--set", "train.ckpt_every=3", "--set", "train.warmup_steps=1",
    "--set", "sample.steps=2", "--set", "sample.sampler=ddim", "--set", "sample.n=4",
]  # fmt: skip


def test_train_on_a_saved_dataset_from_the_command_line(saved, tmp_path, capsys):
    run = tmp_path / "run"
    code = main(["train", "--preset", "folder", "--out", str(run), "--data-dir",
                 str(saved["root"] / "dict"), *FAST])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["name"] == "hf"
    assert cfg["data"]["data_dir"] == str((saved["root"] / "dict").resolve())
    assert (run / "samples.png").is_file()


def test_labels_reach_a_class_conditional_run(saved):
    sets = [s for s in FAST if "=" in s] + [
        f"data.data_dir={saved['root'] / 'single'}",
        "model.num_classes=3",
        "train.batch_size=5",
    ]
    built = build(apply_overrides(get_preset("folder"), sets))
    x, y = make_batch_fn(built)(0, torch.Generator().manual_seed(0))
    # one epoch of 5 images in a batch of 5: every image once, each with its own label
    ref = load_image_dataset("hf", data_dir=saved["root"] / "single", image_size=16, channels=1)
    assert x.shape == (5, 1, 16, 16) and sorted(y.tolist()) == [0, 0, 1, 2, 2]
    images = to_unit_range(ref.images)
    for xi, yi in zip(x, y):  # each image, flipped or not, comes with its own label
        match = [
            i for i in range(5) if torch.equal(images[i], xi) or torch.equal(images[i], xi.flip(-1))
        ]
        assert match and all(ref.labels[i] == yi for i in match)


@pytest.mark.parametrize("problem", ["missing folder", "no image column", "no datasets"])
def test_command_line_errors_are_one_line(saved, tmp_path, monkeypatch, capsys, problem):
    data = {"missing folder": tmp_path / "missing", "no image column": tmp_path / "text"}
    datasets.Dataset.from_dict({"caption": ["a"]}).save_to_disk(tmp_path / "text")
    capsys.readouterr()  # the progress bar of save_to_disk
    if problem == "no datasets":
        monkeypatch.setitem(sys.modules, "datasets", None)
    source = data.get(problem, saved["root"] / "dict")
    run = tmp_path / "run"
    code = main(["train", "--preset", "folder", "--out", str(run), "--data-dir", str(source),
                 *FAST])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: error:") and "\n" not in err, err
    expected = {"missing folder": "does not exist", "no image column": "no image column",
                "no datasets": "pip install 'difflab[hf]'"}  # fmt: skip
    assert expected[problem] in err
    assert not run.exists()  # refused before the run directory is made


def test_the_butterflies_preset_is_the_course_recipe():
    cfg = get_preset("butterflies")
    assert cfg.data.name == "hf" and cfg.data.data_dir == "hf:huggan/smithsonian_butterflies_subset"
    assert cfg_data_shape(cfg) == (3, 32, 32) and cfg.data.hflip
    # 1000 images, batch 64, 30 epochs: ceil(1000 / 64) * 30 optimiser steps
    assert cfg.train.steps == -(-1000 // 64) * 30 and cfg.train.lr == 4e-4
    check_config(cfg)  # a valid run: data name, model and sampler are known
