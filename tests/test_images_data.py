"""Image datasets from tiny fixtures built here: IDX, CIFAR-10 batches, image folders, downloads."""

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
from typing import get_args

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.data import download as download_mod
from difflab.data.download import RemoteFile, download, sha256_file
from difflab.data.images import (
    IMAGE_DATASETS,
    ImageDataset,
    ImageDatasetName,
    load_image_dataset,
    read_cifar_batch,
    read_idx,
    to_uint8,
    to_unit_range,
)

IDX_CODES = {
    np.uint8: 0x08,
    np.int8: 0x09,
    np.int16: 0x0B,
    np.int32: 0x0C,
    np.float32: 0x0D,
    np.float64: 0x0E,
}


def write_idx(path, array: np.ndarray, *, gz: bool) -> None:
    """The IDX format: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, IDX_CODES[array.dtype.type], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if gz else payload)


def make_idx_dataset(root, *, n_train=7, n_test=5, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        suffix = ".gz" if gz else ""
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", imgs, gz=gz)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gz=gz)
        out[prefix] = (imgs, labels)
    return out


# ----------------------------------------------------------------------------- scaling
def test_unit_range_round_trip_is_exact_for_all_values():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    x = to_unit_range(u)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert torch.allclose(x, u.double().float() / 127.5 - 1)
    assert torch.equal(to_uint8(x), u)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 5.0, 0.0])), torch.tensor([0, 255, 128]))
    with pytest.raises(ValueError, match="uint8"):
        to_unit_range(x)


# ----------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("dtype", list(IDX_CODES))
@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype)
    write_idx(tmp_path / "a.idx", arr, gz=gz)
    out = read_idx(tmp_path / "a.idx")
    assert out.shape == (3, 4, 5)
    assert np.array_equal(out.numpy(), arr)


def test_read_idx_errors(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "ok", arr, gz=False)
    raw = (tmp_path / "ok").read_bytes()
    (tmp_path / "trunc").write_bytes(raw[:-5])
    with pytest.raises(ValueError, match="truncated IDX file.*24 data bytes.*19"):
        read_idx(tmp_path / "trunc")
    (tmp_path / "long").write_bytes(raw + b"xx")
    with pytest.raises(ValueError, match="2 unexpected bytes"):
        read_idx(tmp_path / "long")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="not an IDX file.*magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "header").write_bytes(raw[:9])
    with pytest.raises(ValueError, match="truncated IDX header"):
        read_idx(tmp_path / "header")
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(ValueError, match="trunc.gz.*gzip"):
        read_idx(tmp_path / "trunc.gz")


# ----------------------------------------------------------------------------- MNIST-style
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_load_idx_dataset_values_and_labels(tmp_path, name):
    ref = make_idx_dataset(tmp_path / name)
    for train, key in ((True, "train"), (False, "t10k")):
        ds = load_image_dataset(name, data_dir=tmp_path, train=train)
        imgs, labels = ref[key]
        assert ds.images.shape == (len(labels), 1, 28, 28) and ds.images.dtype == torch.uint8
        assert np.array_equal(ds.images[:, 0].numpy(), imgs)
        assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
        assert ds.num_classes == 10 and len(ds.class_names) == 10 and not ds.hflip
        x, y = ds.batch(torch.arange(len(ds)))
        assert x.shape == (len(ds), 1, 28, 28) and x.min() >= -1 and x.max() <= 1
        assert torch.equal(to_uint8(x), ds.images) and torch.equal(y, ds.labels)
        x0, y0 = ds[0]
        assert torch.equal(x0, x[0]) and y0 == int(labels[0])


def test_load_idx_dataset_raw_files_directly_in_data_dir(tmp_path):
    ref = make_idx_dataset(tmp_path, gz=False)
    ds = load_image_dataset("mnist", data_dir=tmp_path, train=False)
    assert np.array_equal(ds.images[:, 0].numpy(), ref["t10k"][0])


def test_load_idx_dataset_resize_and_channels(tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    imgs = np.repeat(np.arange(4, dtype=np.uint8)[:, None, None] * 60, 28 * 28).reshape(4, 28, 28)
    labels = np.arange(4, dtype=np.uint8)
    for prefix in ("train", "t10k"):
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", imgs, gz=True)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels, gz=True)
    ds = load_image_dataset("mnist", data_dir=tmp_path, image_size=32, channels=3)
    assert ds.images.shape == (4, 3, 32, 32)
    # a constant image stays constant under resampling, in every channel
    expected = torch.from_numpy(imgs[:, :1, :1]).view(4, 1, 1, 1).expand(4, 3, 32, 32)
    assert torch.equal(ds.images, expected)


def test_idx_resize_is_unbiased_and_close_to_pil(tmp_path):
    """Antialiased resampling has weights summing to one: smooth images keep their mean."""
    i, j = np.meshgrid(np.arange(28), np.arange(28), indexing="ij")
    phases = np.linspace(0, 2 * np.pi, 6, endpoint=False)
    smooth = [127.5 + 100 * np.sin(2 * np.pi * (i + 2 * j) / 56 + p) for p in phases]
    imgs = np.rint(np.stack(smooth)).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", imgs, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(6, np.uint8), gz=False)
    ds = load_image_dataset("mnist", data_dir=tmp_path, image_size=20)
    out = ds.images[:, 0].numpy().astype(np.float64)
    assert abs(out.mean() - imgs.mean()) < 0.1  # truncating instead of rounding gives -0.5
    for k in range(6):
        ref = np.asarray(Image.fromarray(imgs[k]).resize((20, 20), Image.Resampling.BICUBIC))
        assert np.abs(out[k] - ref).max() <= 3


def test_mismatched_idx_counts(tmp_path):
    make_idx_dataset(tmp_path / "mnist")
    write_idx(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", np.zeros(3, np.uint8), gz=True)
    with pytest.raises(ValueError, match="7 images but .* 3 labels"):
        load_image_dataset("mnist", data_dir=tmp_path)


def test_missing_files_error_names_files_and_options(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_image_dataset("fashion-mnist", data_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert "train-images-idx3-ubyte.gz" in msg and "train-labels-idx1-ubyte.gz" in msg
    assert "--data-dir" in msg and "download=True" in msg
    with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz.*--download"):
        load_image_dataset("cifar10", data_dir=tmp_path)


def test_download_true_fetches_and_verifies(tmp_path, monkeypatch):
    server = tmp_path / "server"
    ref = make_idx_dataset(server)
    remotes = tuple(
        RemoteFile(p.name, sha256_file(p), ((tmp_path / "nowhere" / p.name).as_uri(), p.as_uri()))
        for p in sorted(server.iterdir())
    )
    monkeypatch.setitem(download_mod.REMOTE_FILES, "mnist", remotes)
    data = tmp_path / "data"
    ds = load_image_dataset("mnist", data_dir=data, download=True)  # first mirror fails
    assert np.array_equal(ds.images[:, 0].numpy(), ref["train"][0])
    assert (data / "mnist" / "train-images-idx3-ubyte.gz").is_file()
    assert not (data / "mnist" / "t10k-images-idx3-ubyte.gz").exists()  # only what is needed
    named = tmp_path / "mnist"  # a data_dir already named after the dataset is used as is
    load_image_dataset("mnist", data_dir=named, train=False, download=True)
    assert (named / "t10k-labels-idx1-ubyte.gz").is_file() and not (named / "mnist").exists()
    bad = tuple(RemoteFile(r.filename, "0" * 64, r.urls) for r in remotes)
    monkeypatch.setitem(download_mod.REMOTE_FILES, "mnist", bad)
    with pytest.raises(OSError, match="could not download t10k-images.*SHA-256 mismatch"):
        load_image_dataset("mnist", data_dir=data, train=False, download=True)


def test_remote_table_is_well_formed():
    assert set(download_mod.REMOTE_FILES) == {"mnist", "fashion-mnist", "cifar10"}
    for files in download_mod.REMOTE_FILES.values():
        for f in files:
            assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0
            assert f.urls and all(u.endswith("/" + f.filename) for u in f.urls)


# ----------------------------------------------------------------------------- CIFAR-10
def _cifar_pickle(data: np.ndarray, labels: list[int], *, legacy: bool) -> bytes:
    """A batch as the real files store it: a dict with bytes keys holding a uint8 array."""
    batch = {
        b"batch_label": b"fixture",
        b"labels": labels,
        b"data": data,
        b"filenames": [b"img%d.png" % i for i in range(len(labels))],
    }
    if not legacy:
        return pickle.dumps(batch, protocol=5)
    raw = pickle.dumps(batch, protocol=3)  # GLOBAL opcodes; rename to the numpy 1.x module
    return raw.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")


def make_cifar(root, *, per_batch=3, seed=0, legacy=True):
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    ref = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_batch).tolist()
        (folder / name).write_bytes(_cifar_pickle(data, labels, legacy=legacy))
        ref[name] = (data, labels)
    return folder, ref


@pytest.mark.parametrize("legacy", [True, False])
def test_cifar_batch_layout_and_labels(tmp_path, legacy):
    _, ref = make_cifar(tmp_path / "cifar10", legacy=legacy)
    ds = load_image_dataset("cifar10", data_dir=tmp_path)
    data = np.concatenate([ref[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((ref[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert ds.images.shape == (15, 3, 32, 32) and ds.hflip and ds.num_classes == 10
    # row layout: 1024 red, 1024 green, 1024 blue values, each plane row-major
    c, i, j = 2, 5, 17
    assert int(ds.images[4, c, i, j]) == int(data[4, c * 1024 + i * 32 + j])
    assert np.array_equal(ds.images.reshape(15, -1).numpy(), data)
    assert ds.labels.tolist() == labels
    test = load_image_dataset("cifar10", data_dir=tmp_path, train=False)
    assert np.array_equal(test.images.reshape(3, -1).numpy(), ref["test_batch"][0])


def test_cifar_tarball_equals_directory(tmp_path):
    folder, _ = make_cifar(tmp_path / "extracted")
    (tmp_path / "cifar10").mkdir()
    with tarfile.open(tmp_path / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    from_tar = load_image_dataset("cifar10", data_dir=tmp_path)
    from_dir = load_image_dataset("cifar10", data_dir=folder)  # data_dir = the batch folder
    assert torch.equal(from_tar.images, from_dir.images)
    assert torch.equal(from_tar.labels, from_dir.labels)
    # a truncated archive is reported as such
    blob = (tmp_path / "cifar10" / "cifar-10-python.tar.gz").read_bytes()
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated CIFAR-10 archive"):
        load_image_dataset("cifar10", data_dir=tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_4 missing"):
        load_image_dataset("cifar10", data_dir=folder)


def test_cifar_channels_1_uses_luma(tmp_path):
    _, ref = make_cifar(tmp_path)
    ds = load_image_dataset("cifar10", data_dir=tmp_path, channels=1)
    data = np.concatenate([ref[f"data_batch_{i}"][0] for i in range(1, 6)]).astype(np.float64)
    rgb = data.reshape(15, 3, 32, 32)
    luma = np.rint(0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])
    assert ds.images.shape == (15, 1, 32, 32)
    assert np.abs(ds.images[:, 0].numpy().astype(np.float64) - luma).max() <= 1


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_malicious_pickle_is_rejected(tmp_path):
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": _Evil(str(marker)), b"labels": []}, protocol=3)
    with pytest.raises(pickle.UnpicklingError, match="refusing to unpickle .*mkdir"):
        read_cifar_batch(blob)
    folder, _ = make_cifar(tmp_path / "cifar10")
    (folder / "data_batch_3").write_bytes(blob)
    with pytest.raises(pickle.UnpicklingError, match="data_batch_3.*refusing"):
        load_image_dataset("cifar10", data_dir=tmp_path)
    assert not marker.exists()
    # a plain pickle.load would have executed it: the fixture is really malicious
    pickle.loads(blob)
    assert marker.exists()


def test_cifar_batch_structure_errors():
    good = np.zeros((2, 3072), np.uint8)
    with pytest.raises(ValueError, match="uint8 of shape \\(3, 3072\\)"):
        read_cifar_batch(pickle.dumps({b"data": good, b"labels": [0, 1, 2]}, protocol=3))
    with pytest.raises(ValueError, match="'data' and 'labels'"):
        read_cifar_batch(pickle.dumps({b"data": good}, protocol=3))
    with pytest.raises(ValueError, match="not a readable CIFAR-10 batch"):
        read_cifar_batch(b"\x80\x03}q\x00")


# ----------------------------------------------------------------------------- image folders
def _save(path, array, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)


def make_folder(root):
    rng = np.random.default_rng(0)
    arrays = {
        "a/gray.png": rng.integers(0, 256, (16, 16), dtype=np.uint8),
        "a/b/rgb.png": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
        "c/rgb.bmp": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
        "c/d/e/lossless.webp": rng.integers(0, 256, (16, 16, 3), dtype=np.uint8),
    }
    for rel, arr in arrays.items():
        _save(root / rel, arr, **({"lossless": True} if rel.endswith(".webp") else {}))
    _save(root / "photo.JPG", rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), format="JPEG")
    (root / "a" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "notes.txt").write_text("not an image")
    return arrays


def test_folder_loads_nested_images_and_skips_bad_files(tmp_path):
    arrays = make_folder(tmp_path)
    with pytest.warns(UserWarning) as record:
        ds = load_image_dataset("folder", data_dir=tmp_path)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1 and "corrupt.png" in messages[0]  # one line per bad file
    assert ds.images.shape == (5, 3, 16, 16) and ds.hflip and ds.num_classes == 0
    assert (ds.labels == -1).all()
    # files are sorted by path: a/b/rgb.png, a/gray.png, c/d/e/lossless.webp, c/rgb.bmp, photo
    hwc = ds.images.permute(0, 2, 3, 1).numpy()
    assert np.array_equal(hwc[0], arrays["a/b/rgb.png"])
    assert np.array_equal(hwc[1], np.repeat(arrays["a/gray.png"][..., None], 3, -1))
    assert np.array_equal(hwc[2], arrays["c/d/e/lossless.webp"])
    assert np.array_equal(hwc[3], arrays["c/rgb.bmp"])
    with pytest.warns(UserWarning, match="corrupt.png"):
        gray = load_image_dataset("folder", data_dir=tmp_path / "a", channels=1)
    assert gray.images.shape == (2, 1, 16, 16)
    assert np.array_equal(gray.images[1, 0].numpy(), arrays["a/gray.png"])


def test_folder_on_error_raise_names_file(tmp_path):
    make_folder(tmp_path)
    with pytest.raises(OSError, match="cannot read image .*corrupt.png"):
        load_image_dataset("folder", data_dir=tmp_path, on_error="raise")


def test_folder_empty_or_all_bad_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable images"):
        load_image_dataset("folder", data_dir=tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.jpg").write_bytes(b"garbage")
    (tmp_path / "bad" / "y.txt").write_text("hello")
    with pytest.warns(UserWarning, match="x.jpg"), pytest.raises(ValueError, match="1 unreadable"):
        load_image_dataset("folder", data_dir=tmp_path / "bad")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_image_dataset("folder", data_dir=tmp_path / "missing")


def test_folder_resize_and_center_crop(tmp_path):
    wide = np.zeros((10, 30, 3), np.uint8)
    wide[:, 10:20] = 255  # the central 10 x 10 square is white
    _save(tmp_path / "wide.png", wide)
    _save(tmp_path / "big.png", np.full((40, 60), 77, np.uint8))  # shorter side 40 -> 10
    with pytest.raises(ValueError, match="differ in size.*image_size"):
        load_image_dataset("folder", data_dir=tmp_path)
    ds = load_image_dataset("folder", data_dir=tmp_path, image_size=10)
    assert ds.images.shape == (2, 3, 10, 10)
    assert (ds.images[0] == 77).all()  # constant stays constant under resampling
    assert (ds.images[1] == 255).all()  # crop keeps the centre


# ----------------------------------------------------------------------------- ImageDataset
def test_image_dataset_hflip_batches():
    imgs = torch.randint(
        0, 256, (64, 3, 4, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    ds = ImageDataset(imgs, torch.arange(64) % 10, hflip=True)
    x, y = ds.batch(torch.arange(64), generator=torch.Generator().manual_seed(1))
    x2, _ = ds.batch(torch.arange(64), generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, x2)
    plain, flipped = to_unit_range(imgs), to_unit_range(imgs).flip(-1)
    same = (x == plain).flatten(1).all(1)
    mirrored = (x == flipped).flatten(1).all(1)
    assert (same | mirrored).all() and same.any() and mirrored.any()
    assert torch.equal(y, torch.arange(64) % 10)
    item, label = ds[3]
    assert label == 3 and (torch.equal(item, plain[3]) or torch.equal(item, flipped[3]))
    xb, yb = ds.random_batch(8, generator=torch.Generator().manual_seed(0))
    assert xb.shape == (8, 3, 4, 5) and yb.shape == (8,)
    no_flip = ImageDataset(imgs)
    assert torch.equal(no_flip.batch([5, 6])[0], plain[5:7])
    assert no_flip.num_classes == 0 and (no_flip.labels == -1).all()


def test_image_dataset_validation():
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3))
    with pytest.raises(ValueError, match="num_classes"):
        ImageDataset(
            torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.tensor([0, 5]), num_classes=3
        )


def test_load_image_dataset_option_errors(tmp_path):
    with pytest.raises(ValueError, match="mnist, fashion-mnist, cifar10, folder"):
        load_image_dataset("imagenet", data_dir=tmp_path)
    with pytest.raises(ValueError, match="skip, raise"):
        load_image_dataset("folder", data_dir=tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="channels"):
        load_image_dataset("folder", data_dir=tmp_path, channels=2)
    assert IMAGE_DATASETS == ("mnist", "fashion-mnist", "cifar10", "folder", "hf")
    assert get_args(ImageDatasetName) == IMAGE_DATASETS  # the Literal and the table agree
    with pytest.raises(ValueError, match="image_column='img' applies to hf data, not 'folder'"):
        load_image_dataset("folder", data_dir=tmp_path, image_column="img")


# ----------------------------------------------------------------------------- download
def test_download_file_url_verifies_and_renames(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(3000))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    dest = tmp_path / "out" / "file.bin"
    assert download(src.as_uri(), dest, sha256=digest) == dest
    assert dest.read_bytes() == src.read_bytes()
    # present with the right hash: no new download (the URL no longer exists)
    src.unlink()
    assert download(src.as_uri(), dest, sha256=digest.upper()) == dest
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]


def test_download_mismatch_deletes_partial_file(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"hello world")
    actual = hashlib.sha256(b"hello world").hexdigest()
    dest = tmp_path / "out" / "file.bin"
    with pytest.raises(ValueError) as info:
        download(src.as_uri(), dest, sha256="ab" * 32)
    msg = str(info.value)
    assert "file.bin" in msg and "ab" * 32 in msg and actual in msg and "\n" not in msg
    assert list(dest.parent.iterdir()) == []


def test_download_replaces_wrong_existing_file_and_reports_missing_url(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    dest = tmp_path / "file.bin"
    dest.write_bytes(b"stale")
    download(src.as_uri(), dest, sha256=hashlib.sha256(b"payload").hexdigest())
    assert dest.read_bytes() == b"payload"
    missing = (tmp_path / "missing.bin").as_uri()
    with pytest.raises(OSError, match="could not download .*missing.bin"):
        download(missing, tmp_path / "x" / "y.bin", sha256="0" * 64)
    assert list((tmp_path / "x").iterdir()) == []
    with pytest.raises(ValueError, match="64 hexadecimal"):
        download(src.as_uri(), dest, sha256="1234")


def test_read_cifar_batch_accepts_str_keys():
    data = np.arange(3072 * 2, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    imgs, labels = read_cifar_batch(pickle.dumps({"data": data, "labels": np.array([3, 4])}))
    assert imgs.shape == (2, 3, 32, 32) and labels.tolist() == [3, 4]
    assert np.array_equal(imgs.reshape(2, -1).numpy(), data)
    buf = io.BytesIO()
    np.save(buf, data)  # unrelated formats are rejected cleanly, not executed
    with pytest.raises((ValueError, pickle.UnpicklingError)):
        read_cifar_batch(buf.getvalue())
