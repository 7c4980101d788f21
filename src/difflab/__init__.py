"""difflab: diffusion models with verified math.

The public API, in the ten lines of the README::

    import difflab as dl

    schedule = dl.DiscreteSchedule.from_name("linear", T=1000)
    denoiser = dl.ModelDenoiser(dl.TimeMLP(dim=2), schedule, parameterization="eps")
    opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-3)
    for step in range(3000):
        loss = dl.diffusion_loss(denoiser, dl.sample_toy("swissroll", 512)).loss
        opt.zero_grad(); loss.backward(); opt.step()
    x = dl.sample(denoiser, schedule, (5000, 2), sampler="ddim", steps=50)

Every name below is re-exported from the module that defines it (``_EXPORTS``). They are
imported on first use (PEP 562), so ``import difflab`` and ``difflab --help`` stay free of torch
and matplotlib; ``import difflab.samplers`` and the like work as usual.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS: dict[str, str] = {
    # schedules: alpha, sigma and log-SNR at any noise level
    "Schedule": "difflab.schedules",
    "DiscreteSchedule": "difflab.schedules",
    "EDMSchedule": "difflab.schedules",
    "FlowMatchSchedule": "difflab.schedules",
    "sampling_timesteps": "difflab.schedules",
    # the forward process
    "q_sample": "difflab.process",
    "q_posterior": "difflab.process",
    # denoisers: a network and a parameterisation
    "Denoiser": "difflab.parameterization",
    "Prediction": "difflab.parameterization",
    "ModelDenoiser": "difflab.parameterization",
    # training
    "diffusion_loss": "difflab.objectives",
    # sampling
    "sample": "difflab.samplers",
    "SAMPLERS": "difflab.samplers",
    "nfe": "difflab.samplers",
    # few-step generation by training
    "progressive_distillation": "difflab.distill.progressive",
    "ConsistencyDenoiser": "difflab.distill.consistency",
    # guidance: a denoiser in, a denoiser out
    "ClassifierFreeGuidance": "difflab.guidance",
    "ClassifierGuidance": "difflab.guidance",
    # likelihoods
    "vlb": "difflab.likelihood",
    "bits_per_dim": "difflab.likelihood",
    "pf_ode_nll": "difflab.ode_likelihood",
    # networks
    "TimeMLP": "difflab.nn.mlp",
    "UNetConfig": "difflab.nn.unet",
    "build_unet": "difflab.nn.unet",
    # data and exact oracles
    "sample_toy": "difflab.data.toy",
    "GaussianDenoiser": "difflab.oracles",
    "GMMDenoiser": "difflab.oracles",
    "GaussianConsistencyFunction": "difflab.oracles",
    "gaussian_pf_ode_solution": "difflab.oracles",
    "gaussian_sde_mean": "difflab.oracles",
    # trained runs (and diffusers folders): sample and evaluate them from Python
    "load_run": "difflab.app.api",
    "Run": "difflab.app.api",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'difflab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
