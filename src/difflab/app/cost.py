"""What a run's network costs: its parameters and forward FLOPs per image
(:mod:`difflab.nn.cost`), from the config alone.

The network is the one the run trains, built by its task from the network table at the data
shape it sees: the denoiser on the latents of a latent run (not the frozen autoencoder), the
super-resolution network of a cascade stage (not its frozen base), a distillation's student (not
its frozen teacher), the classifier, the autoencoder. It is built on the meta device, so nothing
is allocated or computed (a network that computes at construction, the Sohl-Dickstein model, is
built on the CPU). ``difflab presets`` shows it for every preset, ``difflab train`` on its first
line.
"""

from __future__ import annotations

import torch

from difflab.app.build import build_schedule, cfg_data_shape
from difflab.app.config import RunConfig
from difflab.app.distill import DistillModel
from difflab.app.kinds import LatentModel, SRModel, kind_of
from difflab.nn.cost import NetworkCost, spec_cost

__all__ = ["cost_column", "run_cost"]


def run_cost(cfg: RunConfig) -> NetworkCost:
    """Parameters and forward FLOPs per image of the network that a run of ``cfg`` trains."""
    kind = kind_of(cfg)
    schedule, shape = build_schedule(cfg), cfg_data_shape(cfg)
    try:
        with torch.device("meta"):
            model = kind.build_model(cfg, shape, schedule)
    except (RuntimeError, NotImplementedError):  # a value read at construction: build it
        model = kind.build_model(cfg, shape, schedule)
    if isinstance(model, LatentModel):
        model, shape = model.unet, model.ae.latent_shape()
    elif isinstance(model, SRModel):
        model = model.unet
    elif isinstance(model, DistillModel):  # the student (the teachers are frozen)
        model = model.student
    return spec_cost(model, kind.net_spec(cfg, shape, schedule))


def cost_column(cfg: RunConfig) -> str:
    """The cost column of ``difflab presets``: "params=0.706M gflops/img=0.0946"."""
    cost = run_cost(cfg)
    return f"params={cost.parameters / 1e6:.3g}M gflops/img={cost.gflops()}"
