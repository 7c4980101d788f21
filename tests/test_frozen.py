"""Frozen dependency runs: one loader reads a run another run is built on, shape-checks and
loads its EMA weights, and the dependent run stores its path, config and weight hash."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from difflab import checkpoint as ckpt
from difflab.app.frozen import load_frozen_run, stored_frozen, weights_sha256, with_frozen
from difflab.app.runs import load_run

BASE = Path(__file__).resolve().parent / "data" / "runs-2026-12" / "base"


def test_a_dependency_loads_into_its_network_and_is_stored_with_its_hash():
    net = load_run(BASE, ema=False).model  # the same network, other (raw) weights
    ema = ckpt.load_checkpoint(BASE).tensors["ema"]
    seen = []
    run = load_frozen_run(BASE, net, role="model.base", expect=lambda c: seen.append(c.preset))
    assert seen == ["mnist-14"] and run.config.preset == "mnist-14"
    assert all(torch.equal(net.state_dict()[k], v) for k, v in ema.items())
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert (
        run.sha256
        == weights_sha256(ema)
        != weights_sha256(ckpt.load_checkpoint(BASE).tensors["model"])
    )
    stored = with_frozen(None, "base", run)
    assert json.loads(stored)["base"]["sha256"] == run.sha256
    assert stored_frozen(stored, "base") == run.config and stored_frozen(stored, "teacher") is None


def test_a_dependency_that_does_not_fit_or_is_refused_names_the_setting(tmp_path):
    from difflab.nn.unet import build_unet

    wrong = build_unet("tiny", in_channels=3, image_size=8)
    with pytest.raises(ckpt.CheckpointError, match=r"model.base=.*base: its weights do not fit"):
        load_frozen_run(BASE, wrong, role="model.base")

    def refuse(cfg):
        raise ValueError("not a teacher")

    with pytest.raises(ValueError, match="not a teacher"):
        load_frozen_run(BASE, wrong, role="model.teacher", expect=refuse)
    with pytest.raises(ValueError, match=r"model.teacher=.*: not a run directory"):
        load_frozen_run(tmp_path, wrong, role="model.teacher")
