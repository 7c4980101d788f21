"""The Python entry to trained runs: ``run = difflab.load_run(path)``, then ``run.sample(...)``
or ``run.evaluate(...)``.

``difflab sample``, ``eval`` and ``nll`` are this object seen from the command line: they
parse their flags into the same calls and print what comes back. ::

    import difflab as dl

    run = dl.load_run("runs/mnist-cond")  # a run directory, or a diffusers model folder
    x = run.sample(n=16, sampler="ddim", steps=50, seed=0, label=3, guidance=2.0)
    run.evaluate(n=1000)  # the metrics of `difflab eval` (FDD of digits, 2-D distances)

What a run samples is its task's (:meth:`difflab.app.kinds.RunKind.prepare` and
:meth:`~difflab.app.kinds.RunKind.sample_set`): a cascade samples its base, then
super-resolves; an image-to-image run restores ``inputs``; a latent run decodes its latents.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difflab.app import runs
from difflab.app.build import Built
from difflab.app.evaluate import evaluate_nll, evaluate_quality, inception_quality
from difflab.app.outputs import SampleSet, write_samples
from difflab.app.sampling import SampleRequest
from difflab.data.datasets import dataset

__all__ = ["Run", "load_run"]


def load_run(path: str | Path, *, ema: bool = True, device: str | torch.device = "cpu") -> Run:
    """A trained run (its newest valid checkpoint, EMA weights unless ``ema=False``) or a
    diffusers model folder, on ``device``; everything is checked as it loads (one-line
    ``ValueError`` or :class:`difflab.checkpoint.CheckpointError`)."""
    from difflab.app.build import resolve_device

    dev = resolve_device(device) if isinstance(device, str) else device
    return Run(runs.load_run(path, ema=ema, device=dev), Path(path))


class Run:
    """A loaded run: its config (``cfg``), task (``kind``) and network, ready to sample and
    evaluate. ``built`` holds the parts (:class:`difflab.app.build.Built`)."""

    def __init__(self, built: Built, path: Path) -> None:
        self.built = built
        self.path = path

    @property
    def cfg(self) -> Any:
        return self.built.cfg

    @property
    def kind(self) -> Any:
        return self.built.kind

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, {self.kind.name}, preset={self.cfg.preset!r})"

    # ------------------------------------------------------------------------- sampling
    def sample(
        self, n: int = 16, *, sampler: str | None = None, steps: int | None = None,
        seed: int = 0, **options: Any,
    ) -> Tensor:  # fmt: skip
        """Samples (n, *data_shape) on the CPU, images in [-1, 1]; the same seed gives the
        same samples as ``difflab sample --seed``. ``options``: the fields of
        :class:`~difflab.app.sampling.SampleRequest` (``label``, ``guidance``,
        ``classifier``, ``inputs``, ``eta``, ``threshold``, ``batch_size``, ...)."""
        request = SampleRequest(n=n, sampler=sampler, steps=steps, seed=seed, **options)
        return self.sample_set(self.prepare(request)).samples

    def prepare(self, req: SampleRequest) -> SampleRequest:
        """The request checked by the run's task (before any work), with the run's sampler
        and steps where unset, a classifier run loaded and inputs read."""
        req = req.check()
        s = self.cfg.sample
        req = replace(req, sampler=req.sampler or s.sampler, steps=req.steps or s.steps)
        if req.classifier is not None:
            req = replace(req, classifier=self._classifier(req.classifier))
        return self.kind.prepare(self.built, req)

    def sample_set(self, req: SampleRequest) -> SampleSet:
        """Draw a prepared request (:meth:`prepare`): the samples and the files they make."""
        start = time.perf_counter()
        out = self.kind.sample_set(self.built, req)
        out.seconds = time.perf_counter() - start
        return out

    def write(self, out: Path, s: SampleSet, req: SampleRequest) -> list[Path]:
        """Write a draw as ``out`` (.npz) and its .png, .gif and timing .json
        (:func:`difflab.app.outputs.write_samples`)."""
        speed = {k: getattr(req, k) for k in ("batch_size", "compile", "bf16", "cuda_graph")}
        return write_samples(out, s, run_dir=str(self.path), device=str(self.built.device), **speed)

    def _classifier(self, clf: str | Path | Run | torch.nn.Module) -> torch.nn.Module:
        """The noise-aware classifier of a classifier run, checked against this run."""
        if isinstance(clf, torch.nn.Module):
            return clf
        run = clf if isinstance(clf, Run) else load_run(clf, device=self.built.device)
        where = run.path
        if not run.kind.guides_sampling:
            raise ValueError(f"{where} is not a classifier run (model.kind={run.cfg.model.kind})")
        if run.built.schedule.to_config() != self.built.schedule.to_config():
            raise ValueError(
                f"{where} was trained with another noise schedule than the diffusion run"
            )
        if tuple(run.built.data_shape) != tuple(self.built.data_shape):
            raise ValueError(
                f"{where} classifies images of shape {tuple(run.built.data_shape)}, the "
                f"diffusion run makes {tuple(self.built.data_shape)}"
            )
        return run.built.model

    # ------------------------------------------------------------------------- evaluation
    def with_data(self, data: str | None = None, data_dir: str | None = None) -> Run:
        """The run evaluated on another data set (``data``) or data folder (``data_dir``)."""
        if data is None and data_dir is None:
            return self
        d = self.cfg.data
        name = data or d.name
        fixed = dataset(name).shape is not None  # its own size, not the run's image_size
        size = {"image_size": None, "channels": None} if fixed else {}
        new = replace(d, name=name, data_dir=data_dir or d.data_dir, **size)
        return Run(replace(self.built, cfg=replace(self.cfg, data=new)), self.path)

    def evaluate(
        self, n: int = 5000, *, metric: str = "fdd", sampler: str | None = None,
        steps: int | None = None, seed: int = 0, inception: str | Path | None = None,
        resize: str = "clean", progress: bool = False, compile: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """``difflab eval``: quality metrics of n samples. ``metric="fdd"``: what the task
        scores (the Frechet digit distance of digits, distances of 2-D points, an
        autoencoder's PSNR); ``"fid"``, ``"kid"``, ``"pr"``: Inception metrics against the
        data set's reference split (``inception``: the weights; ``resize``: clean or
        legacy-tensorflow)."""
        SampleRequest(n=n, steps=steps, seed=seed).check()
        common = {"n": n, "seed": seed, "sampler": sampler or self.cfg.sample.sampler,
                  "steps": steps or self.cfg.sample.steps, "progress": progress,
                  "compile": compile}  # fmt: skip
        if metric == "fdd":
            return evaluate_quality(self.built, **common)
        return inception_quality(
            self.built, metric=metric, inception=inception, resize=resize, **common
        )

    def nll(self, n: int = 1000, *, seed: int = 0, **options: Any) -> dict[str, Any]:
        """``difflab nll``: the VLB and PF-ODE negative log-likelihood of n held-out examples
        (``options``: as :func:`difflab.app.evaluate.evaluate_nll`)."""
        SampleRequest(n=n, seed=seed).check()
        return evaluate_nll(self.built, n=n, seed=seed, **options)
