"""Frechet Digit Distance: classifier training, caching, features and the distance itself.

Everything runs on a synthetic digit-like dataset (10 glyph classes drawn with numpy, randomly
shifted, with random stroke width, intensity and pixel noise), so no real MNIST is needed.
"""

import gzip
import hashlib
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from difflab import evaluation
from difflab.data.images import to_unit_range
from difflab.evaluation import (
    FEATURE_DIM,
    DigitFeatureNet,
    class_histogram,
    classification_accuracy,
    classifier_cache_path,
    classify,
    frechet_digit_distance,
    image_features,
    load_or_train_classifier,
    train_digit_classifier,
)
from difflab.metrics import feature_statistics

F64 = torch.float64


# ----------------------------------------------------------------------------- synthetic glyphs
def _glyph(label: int, dy: np.ndarray, dx: np.ndarray, h: float) -> np.ndarray:
    """Boolean stroke mask of glyph ``label`` on offsets (dy, dx) from its centre."""
    ady, adx, d = np.abs(dy), np.abs(dx), 1.4 * h
    vbar = (adx <= h) & (ady <= 7)
    hbar = (ady <= h) & (adx <= 7)
    diag = (np.abs(dy - dx) <= d) & (ady <= 7)
    anti = (np.abs(dy + dx) <= d) & (ady <= 7)
    masks = [
        np.abs(np.hypot(dy, dx) - 6) <= h,  # ring
        vbar,
        hbar,
        vbar | hbar,  # plus
        (diag | anti) & (ady <= 6),  # cross
        (ady <= 5) & (adx <= 5),  # filled square
        np.abs(np.maximum(ady, adx) - 6) <= h,  # square outline
        diag,
        anti,
        ((np.abs(dy + 6) <= h) & (adx <= 7)) | vbar,  # T
    ]
    return masks[label]


def synthetic_digits(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (n, 1, 28, 28) and balanced labels (n,) of 10 glyph classes."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % 10)
    yy, xx = np.mgrid[0:28, 0:28].astype(np.float64)
    images = np.empty((n, 28, 28), dtype=np.float64)
    for i, label in enumerate(labels):
        cy, cx = 13.5 + rng.integers(-3, 4, size=2)
        mask = _glyph(int(label), yy - cy, xx - cx, rng.choice([1.0, 1.5]))
        images[i] = mask * rng.uniform(160, 255) + rng.normal(0, 12, size=(28, 28))
    images = np.clip(np.round(images), 0, 255).astype(np.uint8)
    return torch.from_numpy(images[:, None]), torch.from_numpy(labels.astype(np.int64))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def _write_mnist(root: Path, n_train: int = 256, n_test: int = 100, seed: int = 0) -> Path:
    """A synthetic dataset in the MNIST IDX layout under root/mnist/."""
    folder = root / "mnist"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
        images, labels = synthetic_digits(n, s)
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images[:, 0].numpy())
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels.numpy())
    return root


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These small convolutions run fastest on one thread, above all on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    images, labels = synthetic_digits(1000, seed=0)
    return train_digit_classifier(images, labels, epochs=2, batch_size=32, seed=0)


@pytest.fixture(scope="module")
def held_out():
    return synthetic_digits(600, seed=1)


@pytest.fixture(scope="module")
def held_out_features(trained, held_out):
    return image_features(trained, held_out[0])


@pytest.fixture(scope="module")
def reference_features(trained):
    images, _ = synthetic_digits(600, seed=2)
    return image_features(trained, images)


# ----------------------------------------------------------------------------- network, training
def test_network_shapes():
    net = DigitFeatureNet()
    x = torch.zeros(3, 1, 28, 28)
    assert net.features(x).shape == (3, FEATURE_DIM)
    assert net(x).shape == (3, 10)


def test_classifier_learns_synthetic_digits(trained, held_out):
    images, labels = held_out
    assert not trained.training
    assert classification_accuracy(trained, images, labels) > 0.9


def test_training_is_reproducible_and_leaves_global_rng_alone():
    images, labels = synthetic_digits(128, seed=3)
    rng_before = torch.get_rng_state()
    a = train_digit_classifier(images, labels, epochs=1, batch_size=64, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)
    b = train_digit_classifier(images, labels, epochs=1, batch_size=64, seed=5)
    c = train_digit_classifier(images, labels, epochs=1, batch_size=64, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_random_shift_moves_a_point_by_at_most_max_shift():
    x = torch.full((4000, 1, 28, 28), -1.0)
    x[:, 0, 14, 14] = 1.0
    shifted = evaluation._random_shift(x, 2, torch.Generator().manual_seed(0))
    assert shifted.shape == x.shape
    flat = (shifted[:, 0] == 1.0).flatten(1)
    assert torch.equal(flat.sum(1), torch.ones(4000, dtype=torch.long))  # pixel kept, once
    assert bool((shifted[shifted != 1.0] == -1.0).all())  # background filled with -1
    rows, cols = flat.float().argmax(1) // 28, flat.float().argmax(1) % 28
    offsets = set(zip((rows - 14).tolist(), (cols - 14).tolist()))
    assert offsets == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}


def test_training_rejects_bad_input():
    images, labels = synthetic_digits(20, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        train_digit_classifier(to_unit_range(images), labels, epochs=1)
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        train_digit_classifier(images, labels + 5, epochs=1)
    with pytest.raises(ValueError, match="labels"):
        train_digit_classifier(images, labels[:-1], epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        train_digit_classifier(images, labels, epochs=0)


# ----------------------------------------------------------------------------- features, classes
def test_uint8_and_float_inputs_agree_and_floats_are_clamped(trained, held_out):
    images = held_out[0][:50]
    f_uint8 = image_features(trained, images)
    f_float = image_features(trained, to_unit_range(images), batch_size=7)
    assert f_uint8.shape == (50, FEATURE_DIM) and f_uint8.dtype == F64
    torch.testing.assert_close(f_uint8, f_float, rtol=1e-4, atol=1e-4)  # float32 network
    x = torch.linspace(-3, 3, 50 * 784).reshape(50, 1, 28, 28)
    torch.testing.assert_close(image_features(trained, x), image_features(trained, x.clamp(-1, 1)))


def test_features_reject_bad_input(trained):
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        image_features(trained, torch.zeros(2, 3, 28, 28))
    with pytest.raises(ValueError, match="NaN"):
        image_features(trained, torch.full((2, 1, 28, 28), float("nan")))
    with pytest.raises(ValueError, match="uint8 or floating"):
        image_features(trained, torch.zeros(2, 1, 28, 28, dtype=torch.int32))


def test_classify_and_class_histogram_agree(trained, held_out):
    images, labels = held_out
    predicted = classify(trained, images)
    assert predicted.shape == labels.shape and predicted.dtype == torch.int64
    counts = class_histogram(trained, images, normalize=False)
    fractions = class_histogram(trained, images)
    expected = torch.tensor([(predicted == k).sum().item() for k in range(10)], dtype=F64)
    torch.testing.assert_close(counts, expected)
    torch.testing.assert_close(fractions, expected / len(labels))
    # the balanced held-out set is classified into roughly balanced classes
    assert float((fractions - 0.1).abs().max()) < 0.05
    # a set of one class lands mostly in that class's bin
    hist_3 = class_histogram(trained, images[labels == 3])
    assert int(hist_3.argmax()) == 3 and float(hist_3[3]) > 0.5


# ----------------------------------------------------------------------------- the distance
def test_fd_of_a_set_with_itself_is_zero_and_fd_is_symmetric(trained, held_out_features):
    f = held_out_features
    scale = float(feature_statistics(f)[1].trace())
    assert frechet_digit_distance(f, f, net=trained) <= 1e-7 * scale
    a, b = f[:300], f[300:]
    fd_ab = frechet_digit_distance(a, b, net=trained)
    assert fd_ab > 0
    assert frechet_digit_distance(b, a, net=trained) == pytest.approx(fd_ab, rel=1e-6)


def test_fd_inputs_images_features_statistics_agree(
    trained, held_out, held_out_features, reference_features
):
    images = held_out[0]
    from_images = frechet_digit_distance(images, reference_features, net=trained)
    stats = feature_statistics(reference_features)
    from_stats = frechet_digit_distance(held_out_features, stats, net=trained)
    assert from_stats == pytest.approx(from_images, rel=1e-9)


def test_fd_of_a_translated_feature_set_is_the_squared_shift(reference_features):
    # Same covariance, means apart by c: d^2 = |c|^2 exactly [Heusel 2017, Eq. (6)].
    c = torch.linspace(-0.5, 0.5, FEATURE_DIM, dtype=F64)
    fd = frechet_digit_distance(reference_features + c, reference_features, net=DigitFeatureNet())
    assert fd == pytest.approx(float(c.square().sum()), rel=1e-6)


def test_fd_grows_monotonically_with_noise(trained, held_out, reference_features):
    x = to_unit_range(held_out[0][:400])
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    fds = [
        frechet_digit_distance((x + s * noise).clamp(-1, 1), reference_features, net=trained)
        for s in (0.0, 0.1, 0.2, 0.4, 0.8)
    ]
    assert all(lo < hi for lo, hi in zip(fds, fds[1:])), fds
    assert fds[-1] > 10 * fds[0]


def test_fd_ranks_bad_samples_above_real_ones(
    trained, held_out, held_out_features, reference_features
):
    images, labels = held_out
    real = frechet_digit_distance(held_out_features, reference_features, net=trained)
    one_glyph = images[:1].expand(300, -1, -1, -1)
    one_class = images[labels == 5]
    noise = torch.rand(300, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    for bad in (one_glyph, one_class, noise):
        assert frechet_digit_distance(bad, reference_features, net=trained) > 5 * real


def test_fd_rejects_bad_input(trained):
    with pytest.raises(ValueError, match="features must have shape"):
        frechet_digit_distance(torch.zeros(5, 3), torch.zeros(5, 3), net=trained)
    with pytest.raises(ValueError, match="images"):
        frechet_digit_distance(torch.zeros(5), torch.zeros(5, FEATURE_DIM), net=trained)


# ----------------------------------------------------------------------------- cache
class _Spy:
    """Counts calls to train_digit_classifier, keeping its behaviour."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return train_digit_classifier(*args, **kwargs)


def _refuse(*args, **kwargs):
    raise AssertionError("train_digit_classifier must not be called when the cache is valid")


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _write_mnist(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def filled_cache(data_dir, tmp_path_factory):
    """A cache directory holding one trained classifier, and that classifier."""
    cache = tmp_path_factory.mktemp("cache")
    return cache, load_or_train_classifier(data_dir=data_dir, cache_dir=cache, device="cpu")


def test_cache_is_written_and_reused(data_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    spy = _Spy()
    monkeypatch.setattr(evaluation, "train_digit_classifier", spy)
    first = load_or_train_classifier(data_dir=data_dir, cache_dir=cache, device="cpu")
    assert spy.calls == 1 and not first.training
    (weights,) = cache.glob("*.safetensors")
    assert weights.name.startswith(f"mnist-digitnet-v{evaluation.RECIPE_VERSION}-")
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert 0.0 <= meta["test_accuracy"] <= 1.0
    assert meta["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert not list(cache.glob("*.tmp"))  # no temporary files left behind

    monkeypatch.setattr(evaluation, "train_digit_classifier", _refuse)
    second = load_or_train_classifier(data_dir=data_dir, cache_dir=cache, device="cpu")
    assert _same_weights(first, second) and not second.training
    assert first.cache_info == second.cache_info == {**meta, "name": weights.stem}


def test_default_cache_dir_comes_from_environment(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "env-cache"))
    load_or_train_classifier(data_dir=data_dir, device="cpu")
    assert len(list((tmp_path / "env-cache").glob("*.safetensors"))) == 1


def test_cache_name_depends_on_the_training_data(tmp_path):
    images, labels = synthetic_digits(30, seed=0)
    path = classifier_cache_path(images, labels, cache_dir=tmp_path)
    assert classifier_cache_path(images.clone(), labels.clone(), cache_dir=tmp_path) == path
    changed = labels.clone()
    changed[0] = (changed[0] + 1) % 10
    assert classifier_cache_path(images, changed, cache_dir=tmp_path) != path
    brighter = images.clone()
    brighter[0, 0, 0, 0] ^= 1
    assert classifier_cache_path(brighter, labels, cache_dir=tmp_path) != path


def _truncate(weights: Path) -> None:
    weights.write_bytes(weights.read_bytes()[:100])


def _flip_byte(weights: Path) -> None:
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor data: the header stays valid
    weights.write_bytes(bytes(data))


def _garble_sidecar(weights: Path) -> None:
    weights.with_suffix(".json").write_text("{not json")


def _remove_weights(weights: Path) -> None:
    weights.unlink()


@pytest.mark.parametrize("corrupt", [_truncate, _flip_byte, _garble_sidecar, _remove_weights])
def test_corrupted_cache_is_detected_and_retrained(
    corrupt, data_dir, filled_cache, tmp_path, monkeypatch
):
    cache = tmp_path / "cache"
    shutil.copytree(filled_cache[0], cache)
    first = filled_cache[1]
    (weights,) = cache.glob("*.safetensors")
    corrupt(weights)
    spy = _Spy()
    monkeypatch.setattr(evaluation, "train_digit_classifier", spy)
    with pytest.warns(UserWarning, match="corrupt"):
        again = load_or_train_classifier(data_dir=data_dir, cache_dir=cache, device="cpu")
    assert spy.calls == 1
    assert _same_weights(first, again)  # same seed, same data: the same network again
    monkeypatch.setattr(evaluation, "train_digit_classifier", _refuse)
    load_or_train_classifier(data_dir=data_dir, cache_dir=cache, device="cpu")


def test_load_or_train_rejects_unknown_dataset(tmp_path):
    with pytest.raises(ValueError, match="valid options: mnist, fashion-mnist"):
        load_or_train_classifier(data_dir=tmp_path, dataset="cifar10")  # type: ignore[arg-type]
