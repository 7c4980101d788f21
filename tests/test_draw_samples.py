"""Samples drawn in batches: every batch is a fresh draw, and a seed reproduces all of them."""

import pytest
import torch

from difflab.app.config import apply_overrides, get_preset
from difflab.app.runs import build
from difflab.app.sampling import draw_samples


@pytest.fixture(scope="module")
def built():
    cfg = apply_overrides(get_preset("moons"), ["model.hidden=16", "model.depth=1"])
    torch.manual_seed(0)
    b = build(cfg, device=torch.device("cpu"), load_data=False)
    with torch.no_grad():  # zero-initialised output layers would make the network trivial
        for p in b.model.parameters():
            p.normal_(0, 0.3)
    return b


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_batches_differ_and_a_seed_reproduces_them(built, sampler):
    """Oracle: independent draws of a continuous law are never equal, and a seed is a
    function of the whole output. Bugs caught: seeding the generator again for each batch
    (every batch would repeat the first one: 10 samples holding 4 distinct points),
    or a generator that is not the seeded one (the same seed would not reproduce)."""
    kw = {"sampler": sampler, "steps": 4, "batch_size": 4}
    x = draw_samples(built, 10, seed=5, **kw)  # batches of 4, 4 and 2
    assert x.shape == (10, 2) and torch.isfinite(x).all()
    assert torch.unique(x, dim=0).shape[0] == 10  # no sample repeats, within or across batches
    assert not torch.equal(x[:4], x[4:8]) and not torch.equal(x[:2], x[8:])
    assert torch.equal(draw_samples(built, 10, seed=5, **kw), x)  # the seed reproduces them
    assert not torch.equal(draw_samples(built, 10, seed=6, **kw), x)  # another seed does not
