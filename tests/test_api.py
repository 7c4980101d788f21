"""The curated public API: ``import difflab as dl`` gives the main names, cheaply."""

import importlib
import subprocess
import sys

import pytest
import torch

import difflab as dl


def test_the_readme_example_runs_through_dl_names():
    """The ten-line example of the README with dl. names (a few training steps): the loss of
    an eps-model starts near E|eps|^2 = 1 per dimension and the samples are finite 2-D points."""
    torch.manual_seed(0)
    schedule = dl.DiscreteSchedule.from_name("linear", T=1000)
    denoiser = dl.ModelDenoiser(dl.TimeMLP(dim=2), schedule, parameterization="eps")
    opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-3)
    for _ in range(5):
        loss = dl.diffusion_loss(denoiser, dl.sample_toy("swissroll", 512)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert 0.2 < loss.item() < 5.0
    x = dl.sample(denoiser, schedule, (100, 2), sampler="ddim", steps=5)
    assert x.shape == (100, 2) and bool(torch.isfinite(x).all())


@pytest.mark.parametrize("name", dl.__all__)
def test_every_public_name_is_the_object_of_its_module(name):
    module = importlib.import_module(dl._EXPORTS[name])
    assert getattr(dl, name) is getattr(module, name)
    assert name in dir(dl)


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'smaple'"):
        dl.smaple  # noqa: B018


def test_import_difflab_loads_neither_torch_nor_matplotlib():
    """`difflab --help` and `import difflab` stay fast: the names are imported on first use,
    and using the sampling API never pulls in matplotlib."""
    code = (
        "import sys, difflab\n"
        "print('torch' in sys.modules, 'matplotlib' in sys.modules)\n"
        "difflab.sample, difflab.DiscreteSchedule, difflab.TimeMLP\n"
        "print('torch' in sys.modules, 'matplotlib' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:2] == ["False False", "True False"]
