"""Post-hoc EMA: keep two power-function averages while training, choose the EMA length after.

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models" (EDM2),
Sec. 3 and App. C.

Notation (code name -> paper symbol):

==============  ==========================================================================
``t``           training step, counted from 1 (``theta(t)``: the weights after step ``t``)
``gamma``       exponent of the power-function profile, gamma > -1
``sigma_rel``   relative standard deviation of the averaging profile (the EMA "length")
``beta``        decay of the running update at step ``t``: ``(1 - 1/t) ** (gamma + 1)``
``w``           weights of theta(1..T) in an average (each row of the least-squares system)
==============  ==========================================================================

**The profile.** The power-function EMA at time ``t`` averages the weights of the whole run
with density ``p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)`` on ``[0, t]`` (EDM2 Eq. 2): it
forgets the random start at a rate set by ``gamma``, and its length grows with the run. The
relative standard deviation of that density, ``std(tau) / t``, is (EDM2 Eq. 3)::

    sigma_rel = sqrt((gamma + 1) / ((gamma + 2)**2 (gamma + 3)))

so ``gamma`` is the largest real root of the cubic
``gamma**3 + 7 gamma**2 + (16 - sigma_rel**-2) gamma + (12 - sigma_rel**-2) = 0``. It decreases
for gamma > (-3 + sqrt 5) / 2, where sigma_rel has its maximum 0.3003 (:data:`MAX_SIGMA_REL`).

**The running update.** ``theta_hat(t) = beta(t) theta_hat(t - 1) + (1 - beta(t)) theta(t)``
with ``beta(t) = (1 - 1/t)**(gamma + 1)`` (EDM2 App. C.1). Unrolled, the product of the betas
telescopes, and ``theta_hat(T) = sum_t w_t theta(t)`` with::

    w_t = (t / T)**(gamma + 1) - ((t - 1) / T)**(gamma + 1),    t = 1..T

which is exactly the profile's mass on ``[t - 1, t]`` (:func:`power_ema_weights`).

**Reconstruction.** Every stored snapshot ``k`` (profile ``gamma_k`` at step ``t_k``) is such a
weighted sum with weights ``w^(k)`` (zero after ``t_k``). The average of any other profile at
step ``T`` is approximated by ``sum_k x_k theta_hat_k``, with ``x`` minimising
``|| sum_k x_k w^(k) - w^(target) ||_2`` over the steps 1..T (EDM2 App. C.2, which solves the
same least-squares problem for the continuous profiles). It is solved here on the exact discrete
weights, by a QR factorisation accumulated over blocks of steps, so memory stays bounded for
long runs. By Cauchy-Schwarz the reconstructed weight differs from the exact average by at most
``residual * ||theta(1..T)||_2`` per coordinate (``residual``: the norm minimised).

**Snapshots on disk.** :class:`SnapshotStore` writes ``step-XXXXXXXX.safetensors`` files
(all profiles of one step, atomically) every ``every`` steps; when more than ``keep`` would be
kept, the interval doubles and the snapshots off the new interval are removed, so a run holds
at most ``keep + 1`` snapshot files whatever its length.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from difflab.safe_io import CheckpointError, atomic_write_bytes, one_line

__all__ = [
    "MAX_SIGMA_REL",
    "PowerEMA",
    "Snapshot",
    "SnapshotStore",
    "gamma_to_sigma_rel",
    "list_snapshots",
    "parse_sigma_rels",
    "posthoc_coefficients",
    "power_ema_beta",
    "power_ema_weights",
    "reconstruct",
    "sigma_rel_to_gamma",
]

_GAMMA_AT_MAX = (-3.0 + math.sqrt(5.0)) / 2.0  # d sigma_rel / d gamma = 0 here


def gamma_to_sigma_rel(gamma: float) -> float:
    """EDM2 Eq. 3: the relative standard deviation of the power-function profile."""
    if not gamma > -1:
        raise ValueError(f"gamma must be > -1, got {gamma}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))  # Eq. (3) [Karras 2024]


MAX_SIGMA_REL = gamma_to_sigma_rel(_GAMMA_AT_MAX)  # 0.3003


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma of the profile of relative std ``sigma_rel`` (Eq. 3 solved for gamma:
    the largest real root of its cubic, on the branch where sigma_rel decreases)."""
    if not (isinstance(sigma_rel, (int, float)) and 0 < sigma_rel < MAX_SIGMA_REL):
        raise ValueError(
            f"an EMA length sigma_rel must be in (0, {MAX_SIGMA_REL:.4f}), got {sigma_rel}"
        )
    s2 = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - s2, 12.0 - s2])
    gamma = float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))))
    return max(gamma, _GAMMA_AT_MAX)


def parse_sigma_rels(text: str) -> tuple[float, ...]:
    """``"0.05,0.10"`` -> (0.05, 0.1): the profiles of ``train.posthoc_ema``, at least two
    distinct lengths, each in (0, MAX_SIGMA_REL); a one-line ``ValueError`` otherwise."""
    try:
        values = tuple(float(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(
            f"train.posthoc_ema must be comma-separated EMA lengths such as 0.05,0.10, got {text!r}"
        ) from None
    if len(set(values)) < 2:
        raise ValueError(
            f"train.posthoc_ema needs at least two distinct EMA lengths (e.g. 0.05,0.10), "
            f"got {text!r}"
        )
    for v in values:
        sigma_rel_to_gamma(v)  # the range check
    return values


def power_ema_beta(t: int, gamma: float) -> float:
    """The decay of the running update at step ``t`` >= 1: (1 - 1/t)**(gamma + 1)
    [EDM2 App. C.1]; 0 at t = 1, so the average starts as a copy of theta(1)."""
    return (1.0 - 1.0 / t) ** (gamma + 1.0)


def power_ema_weights(t: int, gamma: float, steps: int | None = None) -> np.ndarray:
    """Weights (float64, shape ``(steps,)``) of theta(1..steps) in the profile ``gamma`` at step
    ``t``: the profile's mass on [i - 1, i] for i <= t, zero after; they sum to 1."""
    steps = t if steps is None else steps
    i = np.arange(1, steps + 1, dtype=np.float64)
    upper = np.minimum(i, t) / t
    lower = np.minimum(i - 1, t) / t
    return upper ** (gamma + 1.0) - lower ** (gamma + 1.0)


def posthoc_coefficients(
    snapshots: Sequence[tuple[int, float]],
    *,
    step: int,
    gamma: float,
    block: int = 1 << 15,
) -> tuple[np.ndarray, float]:
    """Least-squares coefficients x (shape ``(K,)``) of the ``K`` snapshots ``(t_k, gamma_k)``
    whose combination best matches the profile ``gamma`` at ``step`` (EDM2 App. C.2), and the
    residual ``|| sum_k x_k w^(k) - w ||_2``. Snapshots after ``step`` are refused."""
    if not snapshots:
        raise ValueError("no snapshots to reconstruct from")
    late = [t for t, _ in snapshots if t > step]
    if late:
        raise ValueError(f"a snapshot at step {late[0]} is after the target step {step}")
    k = len(snapshots)
    r = np.zeros((0, k + 1))
    for start in range(0, step, block):  # QR of [W | w] accumulated block by block
        n = min(block, step - start)
        cols = []
        for t_k, g_k in [*snapshots, (step, gamma)]:
            w = power_ema_weights(t_k, g_k, start + n)[start:]
            cols.append(w)
        r = np.linalg.qr(np.vstack([r, np.stack(cols, axis=1)]), mode="r")
    r = np.vstack([r, np.zeros((max(k + 1 - r.shape[0], 0), k + 1))])
    x = np.linalg.lstsq(r[:k, :k], r[:k, k], rcond=None)[0]
    residual = float(np.linalg.norm(r[:k, :k] @ x - r[:k, k]) ** 2 + r[k:, k] @ r[k:, k])
    return x, math.sqrt(max(residual, 0.0))


class PowerEMA:
    """Power-function EMA profiles of a model's weights, updated every step (EDM2 Sec. 3).

    Args:
        model: the network being trained; each profile starts as a copy (its initial weights
            get weight 0 from step 1 on, as beta(1) = 0).
        sigma_rels: the relative standard deviations of the profiles (EDM2 keeps 0.05, 0.10).
    """

    def __init__(self, model: nn.Module, sigma_rels: Sequence[float]) -> None:
        self.sigma_rels = tuple(float(s) for s in sigma_rels)
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        self.models = [copy.deepcopy(model).eval().requires_grad_(False) for _ in self.gammas]

    @torch.no_grad()
    def update(self, model: nn.Module, *, step: int) -> None:
        """theta_hat <- beta theta_hat + (1 - beta) theta for step ``step`` >= 1 (the weights
        after that step); buffers are copied."""
        src = [p.detach() for p in model.parameters()]
        for gamma, avg in zip(self.gammas, self.models):
            beta = power_ema_beta(step, gamma)
            torch._foreach_lerp_(list(avg.parameters()), src, 1.0 - beta)
            for b_avg, b in zip(avg.buffers(), model.buffers()):
                b_avg.copy_(b)

    def group_names(self) -> list[str]:
        """Checkpoint tensor-group names of the profiles."""
        return [f"posthoc_ema_{k}" for k in range(len(self.models))]

    def tensors(self) -> dict[str, dict[str, Tensor]]:
        """The profiles' state dicts by group name (for checkpoints and snapshots)."""
        return {
            name: {k: v.detach().cpu() for k, v in avg.state_dict().items()}
            for name, avg in zip(self.group_names(), self.models)
        }

    def load(self, tensors: dict[str, dict[str, Tensor]]) -> None:
        """Restore the profiles from :meth:`tensors` (a checkpoint's groups)."""
        for name, avg in zip(self.group_names(), self.models):
            avg.load_state_dict(tensors[name])


# ----------------------------------------------------------------------------- snapshots
_SNAPSHOT = re.compile(r"step-(\d{8,})\.safetensors")


@dataclass(frozen=True)
class Snapshot:
    """One stored snapshot file: its step and the profiles' gammas and sigma_rels."""

    path: Path
    step: int
    gammas: tuple[float, ...]
    sigma_rels: tuple[float, ...]

    def tensors(self, k: int) -> dict[str, Tensor]:
        """Profile ``k``'s weights (a one-line ``CheckpointError`` naming an unreadable file)."""
        prefix = f"{k}/"
        try:
            with safe_open(self.path, framework="pt") as f:
                return {n[len(prefix) :]: f.get_tensor(n) for n in f.keys() if n.startswith(prefix)}
        except Exception as e:
            raise CheckpointError(f"{self.path}: unreadable snapshot ({one_line(e)})") from e


class SnapshotStore:
    """The post-hoc EMA snapshots of a run: ``FOLDER/step-XXXXXXXX.safetensors``.

    A snapshot is due at step ``t`` when ``t`` is a multiple of :meth:`interval`; writing one
    removes those off the current interval and any of a later step (left by a run killed after
    them and resumed from an earlier checkpoint), so at most ``keep + 1`` remain.
    """

    def __init__(self, folder: str | os.PathLike, *, every: int, keep: int) -> None:
        if every < 1 or keep < 1:
            raise ValueError(f"snapshot interval and count must be >= 1, got {every}, {keep}")
        self.folder = Path(folder)
        self.every = int(every)
        self.keep = int(keep)

    def interval(self, step: int) -> int:
        """``every * 2**j``, the smallest such that at most ``keep`` multiples are <= step."""
        interval = self.every
        while step // interval > self.keep:
            interval *= 2
        return interval

    def due(self, step: int) -> bool:
        return step > 0 and step % self.interval(step) == 0

    def write(self, step: int, ema: PowerEMA) -> Path:
        """Write the profiles of ``step`` atomically, then prune the older snapshots."""
        tensors = {
            f"{k}/{name}": t.contiguous()
            for k, group in enumerate(ema.tensors().values())
            for name, t in group.items()
        }
        meta = {
            "step": str(step),
            "gammas": json.dumps(list(ema.gammas)),
            "sigma_rels": json.dumps(list(ema.sigma_rels)),
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:08d}.safetensors"
        atomic_write_bytes(path, safetensors_bytes(tensors, metadata=meta))
        interval = self.interval(step)
        for old in self.snapshots():  # later ones: of a run killed and resumed from before them
            if old.step != step and (old.step % interval != 0 or old.step > step):
                old.path.unlink(missing_ok=True)
        return path

    def snapshots(self) -> list[Snapshot]:
        """The stored snapshots, oldest first (:func:`list_snapshots`)."""
        return list_snapshots(self.folder)


def list_snapshots(folder: str | os.PathLike) -> list[Snapshot]:
    """The snapshots in ``folder``, oldest first; none if it does not exist. A one-line
    ``CheckpointError`` names an unreadable file."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [_read_snapshot(p) for p in folder.iterdir() if _SNAPSHOT.fullmatch(p.name)]
    return sorted(found, key=lambda s: s.step)


def _read_snapshot(path: Path) -> Snapshot:
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        step = int(meta["step"])
        gammas = tuple(float(g) for g in json.loads(meta["gammas"]))
        sigma_rels = tuple(float(s) for s in json.loads(meta["sigma_rels"]))
    except Exception as e:
        raise CheckpointError(f"{path}: unreadable snapshot ({one_line(e)})") from e
    return Snapshot(path, step, gammas, sigma_rels)


def reconstruct(
    snapshots: Sequence[Snapshot], sigma_rel: float, *, step: int | None = None
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The weights of the power-function EMA of length ``sigma_rel`` at ``step`` (default: the
    newest snapshot's), as a least-squares combination of the stored snapshots (EDM2 App. C.2).

    Returns the state dict (float tensors combined in float64 and cast back; other tensors from
    the newest snapshot) and ``info``: step, gamma, number of snapshots used, residual (the
    norm :func:`posthoc_coefficients` minimises) and that residual relative to the norm of the
    target's weights.
    """
    gamma = sigma_rel_to_gamma(sigma_rel)
    if not snapshots:
        raise ValueError("no post-hoc EMA snapshots to reconstruct from")
    step = max(s.step for s in snapshots) if step is None else step
    used = [(s, k) for s in snapshots if s.step <= step for k in range(len(s.gammas))]
    x, residual = posthoc_coefficients(
        [(s.step, s.gammas[k]) for s, k in used], step=step, gamma=gamma
    )
    newest = max((s for s, _ in used), key=lambda s: s.step)
    out: dict[str, Tensor] = {}
    acc: dict[str, Tensor] = {}
    for (snap, k), coef in zip(used, x):
        for name, t in snap.tensors(k).items():
            if t.is_floating_point():
                term = t.to(torch.float64) * float(coef)
                acc[name] = acc[name] + term if name in acc else term
    for name, t in newest.tensors(0).items():
        out[name] = acc[name].to(t.dtype) if name in acc else t
    info = {
        "step": step,
        "sigma_rel": float(sigma_rel),
        "gamma": gamma,
        "snapshots": len({s.step for s, _ in used}),
        "residual": residual,
        "relative_residual": residual / float(np.linalg.norm(power_ema_weights(step, gamma))),
    }
    return out, info
