"""``difflab ema``: a run with the EMA of any length, reconstructed after training.

A run trained with ``train.posthoc_ema`` (e.g. ``0.05,0.10``) keeps power-function EMA
snapshots in ``RUN/posthoc-ema/`` (:mod:`difflab.posthoc_ema`, Karras et al. 2024, EDM2). This
writes a new run directory: the run's config and newest checkpoint with its ``ema`` weights
replaced by the least-squares reconstruction of the EMA of relative length ``sigma_rel`` at the
newest snapshot's step, so ``difflab sample`` and ``difflab eval`` take it as they take the run.
The run's own files are never written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difflab import checkpoint as ckpt
from difflab.app.runs import read_run_config
from difflab.app.training import POSTHOC_DIR
from difflab.posthoc_ema import list_snapshots, reconstruct, sigma_rel_to_gamma

__all__ = ["default_output", "write_posthoc_run"]


def default_output(run_dir: Path, sigma_rel: float) -> Path:
    """``RUN-ema-SIGMA_REL`` beside the run."""
    return run_dir.parent / f"{run_dir.name}-ema-{sigma_rel:g}"


def write_posthoc_run(
    run_dir: str | Path, sigma_rel: float, out: str | Path | None = None
) -> tuple[Path, dict[str, Any]]:
    """Reconstruct the EMA of length ``sigma_rel`` of ``run_dir`` into the new run ``out``.

    Everything is checked before any weight is read: the length, the run, the output (a new or
    empty folder, not on the run) and that the run has snapshots. Returns ``out`` and the
    reconstruction's info (step, gamma, snapshots used, residual).
    """
    run_dir = Path(run_dir)
    sigma_rel_to_gamma(sigma_rel)  # the range, in one line
    cfg = read_run_config(run_dir)
    out = default_output(run_dir, sigma_rel) if out is None else Path(out)
    ckpt.check_output(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose a new --out")
    snapshots = list_snapshots(run_dir / POSTHOC_DIR)
    if not snapshots:
        raise ValueError(
            f"{run_dir} has no post-hoc EMA snapshots; train a run with "
            "--set train.posthoc_ema=0.05,0.10 to reconstruct its EMA afterwards"
        )
    c = ckpt.load_checkpoint(run_dir)
    weights, info = reconstruct(snapshots, sigma_rel)
    _check_fits(weights, c, run_dir)
    bad = ckpt.first_non_finite(weights, "the reconstruction")
    if bad is not None:
        raise ValueError(f"{run_dir}: the reconstructed weight {bad} is not finite")
    info.update({"source": str(run_dir), "checkpoint_step": c.step})
    lock = ckpt.open_run_dir(out, config=cfg.to_dict(), resume=False)
    try:
        ckpt.save_checkpoint(out, step=c.step, tensors={**c.tensors, "ema": weights}, state=c.state)
        ckpt.mark_finished(out, {"step": c.step, "posthoc_ema": info})
    finally:
        lock.release()
    return out, info


def _check_fits(weights: dict, c: ckpt.Checkpoint, run_dir: Path) -> None:
    """The snapshots' weights must have the names and shapes of the checkpoint's EMA."""
    ema = c.tensors["ema"]
    wrong = sorted(set(weights) ^ set(ema)) or [k for k in ema if weights[k].shape != ema[k].shape]
    if wrong:
        raise ckpt.CheckpointError(
            f"{run_dir / POSTHOC_DIR}: the snapshots do not fit the run's network ({wrong[0]!r})"
        )
