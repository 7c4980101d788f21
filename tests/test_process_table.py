"""The process table: ``diffusion.schedule`` selects one process, which builds the schedule and
gives the loss; a new process is one entry that the app layer uses with no other edit."""

from __future__ import annotations

import pytest
import torch

from difflab.app.build import build_schedule
from difflab.app.config import PRESETS, apply_overrides
from difflab.app.runs import build
from difflab.objectives import diffusion_loss
from difflab.process_table import PROCESSES, SCHEDULE_NAMES, Process, process_for
from difflab.schedules import BETA_SCHEDULES, DiscreteSchedule, EDMSchedule


@pytest.mark.parametrize("name", BETA_SCHEDULES)
def test_discrete_schedules_are_the_named_beta_schedules(name):
    cfg = apply_overrides(PRESETS["moons"], [f"diffusion.schedule={name}", "diffusion.T=50"])
    oracle = DiscreteSchedule.from_name(name, 50)
    assert process_for(name).name == "ddpm"
    assert torch.equal(build_schedule(cfg).alpha_bar, oracle.alpha_bar)  # type: ignore[attr-defined]


def test_edm_schedule_and_a_beta_range():
    cfg = apply_overrides(PRESETS["moons"], ["diffusion.schedule=edm", "diffusion.sigma_max=20"])
    s = build_schedule(cfg)
    assert isinstance(s, EDMSchedule) and (s.t_min, s.t_max) == (0.002, 20.0)
    cfg = apply_overrides(PRESETS["moons"], ["diffusion.beta_start=0.001", "diffusion.T=100"])
    assert float(build_schedule(cfg).betas[0]) == pytest.approx(0.001)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="beta_start/beta_end apply to the linear, .* not 'edm'"):
        build(apply_overrides(cfg, ["diffusion.schedule=edm"]), load_data=False)
    with pytest.raises(ValueError, match="unknown diffusion.schedule 'vp'; choose one of: linear"):
        build(apply_overrides(cfg, ["diffusion.schedule=vp"]), load_data=False)
    assert SCHEDULE_NAMES == (*BETA_SCHEDULES, "edm", "flow")


def test_a_new_process_is_one_entry(monkeypatch):
    """A variance-exploding process with its own schedule name and loss trains a 2-D model."""
    calls = []

    def loss(denoiser, x0, **options):
        calls.append(options["weighting"])
        return diffusion_loss(denoiser, x0, **options)

    ve = Process("ve", ("ve-test",), lambda d: EDMSchedule(0.01, 10.0), lambda d: None, loss)
    monkeypatch.setitem(PROCESSES, "ve", ve)
    sets = ["diffusion.schedule=ve-test", "model.hidden=8", "model.parameterization=edm",
            "diffusion.weighting=edm", "train.device=cpu"]  # fmt: skip
    cfg = apply_overrides(PRESETS["moons"], sets)
    built = build(cfg, load_data=False)
    assert isinstance(built.schedule, EDMSchedule) and built.schedule.t_max == 10.0
    g = torch.Generator().manual_seed(0)
    loss_value, _ = built.kind.loss_fn(built, {})((torch.randn(8, 2, generator=g), None), g)
    loss_value.backward()
    assert calls == ["edm"] and torch.isfinite(loss_value)
