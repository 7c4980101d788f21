"""Frozen dependency runs: a run that another run is built on (a latent run's autoencoder, a
cascade's base model; later a distillation's teacher or a guidance classifier).

One function, :func:`load_frozen_run`, reads the dependency's config and newest checkpoint,
checks its kind, shape-checks its EMA weights against the network the dependent run built for
it, and loads them; the dependent run then stores it one way, in ``model.frozen`` (JSON: role ->
the dependency's resolved path, config and the SHA-256 of its EMA weights) with the weights in
its own checkpoints, so it keeps working after the dependency is moved or deleted.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from difflab import checkpoint as ckpt
from difflab.app.config import RunConfig

__all__ = ["FrozenRun", "frozen_config", "load_frozen_run", "stored_frozen", "weights_sha256"]


@dataclass(frozen=True)
class FrozenRun:
    """A dependency as the dependent run stores it."""

    path: str  # where it was loaded from (resolved)
    config: RunConfig
    sha256: str  # of its EMA weights (:func:`weights_sha256`)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "config": self.config.to_dict(), "sha256": self.sha256}


def weights_sha256(weights: Mapping[str, Tensor]) -> str:
    """SHA-256 of a state dict: every name, dtype, shape and value, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def frozen_config(path: str | Path, *, role: str) -> RunConfig:
    """The config of the dependency run at ``path`` (``role`` names the setting, e.g.
    ``model.base``, in errors)."""
    try:
        return RunConfig.from_dict(ckpt.read_config(path))
    except (OSError, ValueError, ckpt.CheckpointError) as e:
        raise ValueError(f"{role}={path}: not a run directory ({ckpt.one_line(e)})") from None


def load_frozen_run(
    path: str | Path,
    into: nn.Module,
    *,
    role: str,
    expect: Callable[[RunConfig], None] | None = None,
) -> FrozenRun:
    """Load the EMA weights of the run at ``path`` into ``into`` (the network this run built for
    it), after ``expect(config)`` (one-line ``ValueError``) and a shape check; freeze it."""
    cfg = frozen_config(path, role=role)
    if expect is not None:
        expect(cfg)
    c = ckpt.load_checkpoint(path)
    c.check_finite("ema")
    weights = c.tensors["ema"]
    ckpt.check_fits(into, weights, f"{role}={path}")
    into.load_state_dict(dict(weights))
    into.eval().requires_grad_(False)
    return FrozenRun(str(Path(path).resolve()), cfg, weights_sha256(weights))


def stored_frozen(frozen: str | None, role: str) -> RunConfig | None:
    """The config of the dependency ``role`` stored in a run's ``model.frozen`` (None: none)."""
    if frozen is None:
        return None
    try:
        entry = json.loads(frozen).get(role)
        return None if entry is None else RunConfig.from_dict(entry["config"])
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        raise ValueError(f"model.frozen is not a stored dependency list: {e}") from None


def with_frozen(frozen: str | None, role: str, run: FrozenRun) -> str:
    """``model.frozen`` with ``run`` stored as ``role``."""
    entries = {} if frozen is None else json.loads(frozen)
    entries[role] = run.to_json()
    return json.dumps(entries, sort_keys=True)
