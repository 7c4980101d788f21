"""Training objectives: targets, loss types, weightings, time sampling and the hybrid loss.

With x_t = alpha x0 + sigma eps every target is linear in (x0, eps), so the errors of the
different targets are proportional to each other at a fixed noise level. Writing
SNR = alpha^2 / sigma^2 = exp(logsnr) and s = sigma / alpha:

==========  ==============================  ====================================  ================
target      value                           ||error||^2 relative to ||x0 error||^2  paper
==========  ==============================  ====================================  ================
``x0``      x0                              1                                     Ho 2020, Sec 3.2
``eps``     eps                             SNR                                   Ho 2020, Eq. 14
``v``       alpha eps - sigma x0            SNR + 1 (variance preserving)         Salimans 2022
``edm``     F* = (x0 - c_skip y) / c_out    lambda(s) = (s^2 + sd^2) / (s sd)^2   Karras 2022, Eq 8
``flow``    u = eps - x0                    (1 + sqrt(SNR))^2                     Lipman 2023
==========  ==============================  ====================================  ================

(y = x_t / alpha, sd = sigma_data.) A *weighting* is a function of logsnr. ``uniform`` puts
weight 1 on the target's own loss; the others are defined as a weight w on the x0-space MSE and
converted to the target by dividing by the ratio above, so that they mean the same objective
for every target:

* ``snr``      w = SNR: the eps-MSE for every target [Ho 2020; Kingma 2023, Sec. 2].
* ``min-snr``  w = min(SNR, gamma): eps: min(SNR, gamma) / SNR, x0: min(SNR, gamma),
  v: min(SNR, gamma) / (SNR + 1) [Hang 2023, Eq. 8-10].
* ``edm``      w = lambda(s) [Karras 2022, Eq. 8]; for the ``edm`` target this is weight 1 on F.

Flow matching is this loss with the ``flow`` target: the error of u_hat - u = (eps_hat - eps)
- (x0_hat - x0), where eps_hat - eps = -(alpha / sigma) (x0_hat - x0), is (alpha + sigma) /
sigma times the x0 error, for any schedule. On the linear interpolant (alpha = 1 - t,
sigma = t, :class:`~difflab.schedules.FlowMatchSchedule`) this reads

    ||u_hat - u||^2 = ||x0_hat - x0||^2 / t^2 = ||eps_hat - eps||^2 / (1 - t)^2,

so the plain flow-matching loss [Lipman 2023, Eq. 23; Esser 2024, Eq. 9-10] is the x0 loss
with weight 1/t^2 and the eps loss with weight 1/(1 - t)^2 = (1 + sqrt(SNR))^2 / SNR, and the
flow target with the ``snr`` weighting is exactly the eps loss (the weighting of a target is
always defined through x0, so ``min-snr`` and ``edm`` mean the same objective here too).

Times are drawn uniformly (integer steps 1..T of a :class:`DiscreteSchedule`, or U[t_min,
t_max]), log-normally in the EDM sigma [Karras 2022, Table 1], or by :class:`ImportanceTimeSampler`
[Nichol & Dhariwal 2021, Sec. 3.3]; on the flow-matching schedule also logit-normally or by
SD3's mode sampling [Esser 2024, Sec. 3.1], all then moved by the schedule's time shift
(:func:`sample_flow_times`). A denoiser with a learned variance is trained on the hybrid
loss L_simple + lambda L_vlb [Nichol & Dhariwal 2021, Sec. 3.1], see :func:`diffusion_loss`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from difflab._util import F64, broadcast_to, check_choice
from difflab.likelihood import DECODER_TYPES, vlb_term_from_prediction
from difflab.parameterization import (
    PARAMETERIZATIONS,
    ModelDenoiser,
    Parameterization,
    edm_preconditioning,
    u_from_x0_eps,
)
from difflab.process import q_sample
from difflab.schedules import DiscreteSchedule, FlowMatchSchedule, Schedule

__all__ = [
    "LossType",
    "LOSS_TYPES",
    "Weighting",
    "WEIGHTINGS",
    "TimeSampling",
    "TIME_SAMPLINGS",
    "LossOutput",
    "elementwise_loss",
    "loss_weight",
    "sample_training_times",
    "sample_flow_times",
    "check_time_sampling",
    "FlowTimeSampling",
    "FLOW_TIME_SAMPLINGS",
    "ImportanceTimeSampler",
    "diffusion_loss",
]

LossType = Literal["mse", "l1", "huber"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
Weighting = Literal["uniform", "snr", "min-snr", "edm"]
WEIGHTINGS: tuple[str, ...] = get_args(Weighting)
TimeSampling = Literal["uniform", "lognormal", "importance", "logit-normal", "mode"]
TIME_SAMPLINGS: tuple[str, ...] = get_args(TimeSampling)


@dataclass
class LossOutput:
    """Result of :func:`diffusion_loss`.

    Attributes:
        loss: scalar to minimise, the mean of ``per_sample``.
        per_sample: (B,) weighted loss of each sample.
        t: (B,) float64 times used.
        terms: (B,) tensors, still attached to the graph (detach to log): ``raw`` (unweighted
            loss in the target space), ``weight`` (the logsnr weighting), ``simple``
            (weight * raw), ``vlb`` (lambda * T * L_{t-1} in bits/dim, learned variance only),
            ``importance_weight``.
    """

    loss: Tensor
    per_sample: Tensor
    t: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)


def elementwise_loss(
    pred: Tensor, target: Tensor, *, loss_type: LossType = "mse", huber_delta: float = 1.0
) -> Tensor:
    """Per-sample loss (B,): mse, l1 or huber (smooth L1 with ``huber_delta``), mean over dims."""
    check_choice("loss type", loss_type, LOSS_TYPES)
    if loss_type == "mse":
        err = (pred - target) ** 2
    elif loss_type == "l1":
        err = (pred - target).abs()
    else:
        if huber_delta <= 0:
            raise ValueError(f"huber_delta must be > 0, got {huber_delta}")
        err = F.huber_loss(pred, target, reduction="none", delta=huber_delta)
    return err.flatten(1).mean(1)


def loss_weight(
    logsnr: Tensor,
    *,
    weighting: Weighting = "uniform",
    target: Parameterization = "eps",
    gamma: float = 5.0,
    sigma_data: float = 0.5,
) -> Tensor:
    """The weight on the ``target``-space loss as a function of logsnr (float64, shape of logsnr).

    See the module table: w_x0(logsnr) divided by the target's error ratio. The ``v`` ratio
    SNR + 1 assumes a variance-preserving schedule.
    """
    check_choice("weighting", weighting, WEIGHTINGS)
    check_choice("target", target, PARAMETERIZATIONS)
    lam = torch.as_tensor(logsnr, dtype=F64)
    if weighting == "uniform":
        return torch.ones_like(lam)
    snr = torch.exp(lam)
    s2, sd2 = torch.exp(-lam), sigma_data**2  # s^2 = sigma^2 / alpha^2 = 1 / SNR
    lam_edm = (s2 + sd2) / (s2 * sd2)  # Eq. (8) and Table 1 [Karras 2022]
    if weighting == "snr":
        w_x0 = snr
    elif weighting == "min-snr":
        w_x0 = snr.clamp(max=gamma)  # Eq. (8) [Hang 2023]
    else:
        w_x0 = lam_edm
    flow = (1 + torch.exp(lam / 2)) ** 2  # ((alpha + sigma) / sigma)^2, 1 / t^2 on the interpolant
    ratio = {"x0": torch.ones_like(lam), "eps": snr, "v": snr + 1, "edm": lam_edm, "flow": flow}
    return w_x0 / ratio[target]


def sample_training_times(
    schedule: Schedule,
    batch: int,
    *,
    method: Literal["uniform", "lognormal"] = "uniform",
    p_mean: float = -1.2,
    p_std: float = 1.2,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw (batch,) float64 training times on the CPU.

    * ``uniform``: integer steps 1..T for a :class:`DiscreteSchedule` [Ho 2020, Algorithm 1],
      U[t_min, t_max] otherwise.
    * ``lognormal``: ln(sigma) ~ N(p_mean, p_std^2) in the EDM sigma = sigma / alpha
      [Karras 2022, Table 1], mapped to t by the schedule and clamped to [t_min, t_max].
    """
    check_choice("time sampling", method, ("uniform", "lognormal"))
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if method == "uniform":
        if isinstance(schedule, DiscreteSchedule):
            return torch.randint(1, schedule.T + 1, (batch,), generator=generator).to(F64)
        u = torch.rand(batch, generator=generator, dtype=F64)
        return schedule.t_min + (schedule.t_max - schedule.t_min) * u
    ln_sigma = p_mean + p_std * torch.randn(batch, generator=generator, dtype=F64)
    return schedule.t_from_edm_sigma(ln_sigma.exp()).clamp(schedule.t_min, schedule.t_max)


FlowTimeSampling = Literal["uniform", "logit-normal", "mode", "lognormal"]
FLOW_TIME_SAMPLINGS: tuple[str, ...] = get_args(FlowTimeSampling)


def sample_flow_times(
    schedule: FlowMatchSchedule,
    batch: int,
    *,
    method: FlowTimeSampling = "logit-normal",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Draw (batch,) float64 training times of the flow-matching schedule, then shift them.

    * ``uniform``       t ~ U(0, 1) [Lipman 2023; Liu 2023].
    * ``logit-normal``  logit(t) ~ N(m, s^2) [Esser 2024, Eq. 19]; SD3's default is
      ``rf/lognorm(0.00, 1.00)``. On this schedule logit(t) = log(EDM sigma), so EDM's
      log-normal sigma [Karras 2022, Table 1] is the same law with (m, s) = (P_mean, P_std).
    * ``mode``          t = 1 - u - scale (cos^2(pi u / 2) - 1 + u), u ~ U(0, 1)
      [Esser 2024, Eq. 20]; scale in [-1, 2 / (pi - 2)] keeps it monotone (SD3: 1.29).
    * ``lognormal``     the EDM name of the logit-normal law, with the same ``logit_mean`` and
      ``logit_std``.

    Every draw is then mapped through ``schedule.shift_time`` (SD3's shift; none at shift 1).
    """
    check_choice("flow time sampling", method, FLOW_TIME_SAMPLINGS)
    if not isinstance(schedule, FlowMatchSchedule):
        raise ValueError(f"{method} flow times need a FlowMatchSchedule, got {schedule!r}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    if method == "mode" and not -1.0 <= mode_scale <= 2.0 / (math.pi - 2.0):
        raise ValueError(f"mode_scale must lie in [-1, {2 / (math.pi - 2):.4f}], got {mode_scale}")
    if method in ("logit-normal", "lognormal") and not logit_std > 0:
        raise ValueError(f"logit_std must be positive, got {logit_std}")
    if method in ("logit-normal", "lognormal"):
        z = torch.randn(batch, generator=generator, dtype=F64)
        t = torch.sigmoid(logit_mean + logit_std * z)  # Eq. (19) [Esser 2024]
    else:
        u = torch.rand(batch, generator=generator, dtype=F64)
        if method == "mode":  # Eq. (20) [Esser 2024]
            u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
        t = u
    return schedule.shift_time(t.clamp(0, 1))


def check_time_sampling(schedule: Schedule, t_sampling: str) -> str:
    """Validate a time sampling for a schedule, in one line and before any work: a name of
    ``TIME_SAMPLINGS``; ``logit-normal`` and ``mode`` need a :class:`FlowMatchSchedule`,
    ``importance`` a :class:`DiscreteSchedule` (it draws integer steps)."""
    check_choice("time sampling", t_sampling, TIME_SAMPLINGS)
    if t_sampling in ("logit-normal", "mode") and not isinstance(schedule, FlowMatchSchedule):
        raise ValueError(f"{t_sampling} time sampling needs the flow-matching schedule")
    if t_sampling == "importance" and not isinstance(schedule, DiscreteSchedule):
        raise ValueError("importance time sampling needs a discrete (DDPM) schedule")
    return t_sampling


class ImportanceTimeSampler:
    """Importance sampling of the step t for L_vlb [Nichol & Dhariwal 2021, Sec. 3.3, Eq. 18].

    Keeps the last ``history`` losses of each step 1..T. Until every step has ``history``
    values, t is uniform; afterwards p_t is proportional to sqrt(E[L_t^2]), mixed with a
    uniform ``uniform_prob`` as in the reference code. Samples carry importance weights
    1 / (T p_t), so E_p[w L_t] = (1/T) sum_t L_t: the uniform-t objective, unbiased.
    """

    def __init__(self, T: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        if T < 1 or history < 1:
            raise ValueError(f"T and history must be >= 1, got T={T}, history={history}")
        if not 0.0 <= uniform_prob <= 1.0:
            raise ValueError(f"uniform_prob must lie in [0, 1], got {uniform_prob}")
        self.T = T
        self.history = history
        self.uniform_prob = uniform_prob
        self._losses = torch.zeros(T, history, dtype=F64)
        self._counts = torch.zeros(T, dtype=torch.long)

    @property
    def warmed_up(self) -> bool:
        """True once every step has ``history`` recorded losses."""
        return bool((self._counts == self.history).all())

    def probabilities(self) -> Tensor:
        """p_t for t = 1..T, (T,) float64."""
        uniform = torch.full((self.T,), 1.0 / self.T, dtype=F64)
        if not self.warmed_up:
            return uniform
        w = self._losses.pow(2).mean(1).sqrt()  # Eq. (18) [Nichol & Dhariwal 2021]
        if float(w.sum()) <= 0:
            return uniform
        return (1 - self.uniform_prob) * w / w.sum() + self.uniform_prob * uniform

    def weights(self, t: Tensor) -> Tensor:
        """Importance weights 1 / (T p_t) for integer steps t (B,), float64."""
        return 1.0 / (self.T * self.probabilities()[t.detach().cpu().long() - 1])

    def sample(self, batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Draw (t, weights), each (batch,) float64; t holds integer steps 1..T."""
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator).to(F64) + 1
        return t, self.weights(t)

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Record per-sample losses (B,) of steps t (B,); the oldest value of a full step drops."""
        steps = t.detach().cpu().long().tolist()
        values = losses.detach().cpu().to(F64).tolist()
        if len(steps) != len(values):
            raise ValueError("t and losses must have the same length")
        for step, value in zip(steps, values):
            if not 1 <= step <= self.T:
                raise ValueError(f"t must hold steps in 1..{self.T}, got {step}")
            i, n = step - 1, int(self._counts[step - 1])
            if n == self.history:
                self._losses[i, :-1] = self._losses[i, 1:].clone()
                self._losses[i, -1] = value
            else:
                self._losses[i, n] = value
                self._counts[i] = n + 1

    def state_dict(self) -> dict[str, Tensor]:
        """Plain tensors: ``losses`` (T, history) and ``counts`` (T,)."""
        return {"losses": self._losses.clone(), "counts": self._counts.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        losses, counts = state["losses"], state["counts"]
        if tuple(losses.shape) != (self.T, self.history) or tuple(counts.shape) != (self.T,):
            raise ValueError(
                f"state has shapes {tuple(losses.shape)}, {tuple(counts.shape)}; "
                f"this sampler needs ({self.T}, {self.history}) and ({self.T},)"
            )
        self._losses = losses.detach().cpu().to(F64).clone()
        self._counts = counts.detach().cpu().long().clone()


def _in_target_space(
    value_x0: Tensor, value_eps: Tensor, target: str, xt: Tensor, t: Tensor, den: ModelDenoiser
) -> Tensor:
    """Express (x0, eps) -- true or predicted -- as the given target."""
    if target == "x0":
        return value_x0
    if target == "eps":
        return value_eps
    alpha, sigma = den.coefficients(t, xt)
    if target == "v":
        return alpha * value_eps - sigma * value_x0  # [Salimans & Ho 2022, Sec. 4]
    if target == "flow":
        return u_from_x0_eps(value_x0, value_eps)  # [Lipman 2023, Eq. 23]
    c_skip, c_out, _, _ = edm_preconditioning(den.schedule.edm_sigma(t), den.sigma_data)
    # F* = (x0 - c_skip y) / c_out, y = xt / alpha  [Karras 2022, Eq. 8]
    return (value_x0 - broadcast_to(c_skip, xt) * (xt / alpha)) / broadcast_to(c_out, xt)


def diffusion_loss(
    denoiser: ModelDenoiser,
    x0: Tensor,
    *,
    cond: Any = None,
    loss_type: LossType = "mse",
    weighting: Weighting = "uniform",
    t_sampling: TimeSampling = "uniform",
    target: Parameterization | None = None,
    vlb_weight: float = 0.001,
    time_sampler: ImportanceTimeSampler | None = None,
    offset_noise: float = 0.0,
    generator: torch.Generator | None = None,
    t: Tensor | None = None,
    noise: Tensor | None = None,
    huber_delta: float = 1.0,
    min_snr_gamma: float = 5.0,
    flow_logit_mean: float = 0.0,
    flow_logit_std: float = 1.0,
    flow_mode_scale: float = 1.29,
    decoder: Literal["auto", "discretized", "gaussian"] = "auto",
) -> LossOutput:
    """The training loss of a denoiser on a batch of clean data x0 (B, ...).

    Steps: draw t (unless given), then eps ~ N(0, I) (unless ``noise`` is given) plus
    ``offset_noise`` * N(0, 1) per sample and channel [Guttenberg 2023], x_t = alpha x0 +
    sigma eps [Ho 2020, Eq. 4]; compare the network output, read in the ``target`` space
    (default: the denoiser's own parameterization, i.e. the raw output), with the true target
    by ``loss_type``; multiply by ``loss_weight(logsnr(t))``. All draws use ``generator``, in
    the order t, eps, offset.

    With ``denoiser.learned_variance`` the hybrid loss L_simple + lambda L_vlb is used
    [Nichol & Dhariwal 2021, Sec. 3.1]: L_vlb = T * L_{t-1} in bits per dimension (lambda =
    ``vlb_weight``), computed with the mean half of the output detached, so L_vlb trains only
    the variance. ``decoder`` picks the t = 1 term (``auto``: discretised for (B, C, H, W)
    images, Gaussian otherwise).

    On a :class:`~difflab.schedules.FlowMatchSchedule` the times come from
    :func:`sample_flow_times` (``uniform``, ``logit-normal`` or ``lognormal`` with
    ``flow_logit_mean/std``, ``mode`` with ``flow_mode_scale``) and are shifted by the
    schedule; the flow-matching loss is ``target="flow"`` (the denoiser's own target for
    ``parameterization="flow"``) with the ``uniform`` weighting.

    When a ``time_sampler`` is given (required by ``t_sampling="importance"``) the steps come
    from it and the loss carries the weights 1 / (T p_t); the sampler is updated with the
    unweighted per-sample losses (so pass it only to the training loss, not to evaluations).
    """
    check_time_sampling(denoiser.schedule, t_sampling)
    check_choice("decoder", decoder, ("auto", *DECODER_TYPES))
    target = denoiser.parameterization if target is None else target
    check_choice("target", target, PARAMETERIZATIONS)
    schedule = denoiser.schedule
    batch = x0.shape[0]
    if t_sampling == "importance" and time_sampler is None:
        raise ValueError("t_sampling='importance' needs a time_sampler (ImportanceTimeSampler)")
    if time_sampler is not None and t_sampling == "lognormal":
        raise ValueError("a time_sampler draws integer steps; it cannot be combined with lognormal")
    if time_sampler is not None and (
        not isinstance(schedule, DiscreteSchedule) or time_sampler.T != schedule.T
    ):
        raise ValueError("the ImportanceTimeSampler needs a DiscreteSchedule with the same T")
    if target == "v" and weighting != "uniform" and not schedule.variance_preserving:
        raise ValueError("weighting the v target needs a variance-preserving schedule")

    # 1. times and noise
    iw = torch.ones(batch, dtype=F64)
    if t is not None:
        t = torch.as_tensor(t, dtype=F64).detach().cpu()
        t = t.expand(batch).clone() if t.ndim == 0 else t
        if time_sampler is not None:
            iw = time_sampler.weights(t)
    elif time_sampler is not None:
        t, iw = time_sampler.sample(batch, generator)
    elif isinstance(schedule, FlowMatchSchedule):
        kw = {
            "logit_mean": flow_logit_mean,
            "logit_std": flow_logit_std,
            "mode_scale": flow_mode_scale,
        }
        method = "logit-normal" if t_sampling == "lognormal" else t_sampling
        t = sample_flow_times(schedule, batch, method=method, generator=generator, **kw)  # type: ignore[arg-type]
    else:
        t = sample_training_times(schedule, batch, method=t_sampling, generator=generator)  # type: ignore[arg-type]
    if t.shape != (batch,):
        raise ValueError(f"t must have shape ({batch},), got {tuple(t.shape)}")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        if offset_noise:
            shape = (*x0.shape[:2], *([1] * (x0.ndim - 2)))
            offset = torch.randn(shape, generator=generator, dtype=x0.dtype).to(x0.device)
            noise = noise + offset_noise * offset
    elif offset_noise:
        raise ValueError("offset_noise applies to drawn noise; add it to the given noise instead")
    xt = q_sample(x0, t, schedule, eps=noise)

    # 2. network output in the target space
    out = denoiser.network_output(xt, t, cond)
    out_mean, out_var = out.chunk(2, dim=1) if denoiser.learned_variance else (out, None)
    if target == denoiser.parameterization:
        pred_target = out_mean
    else:
        pred = denoiser.prediction_from_output(out, xt, t)
        pred_target = _in_target_space(pred.x0, pred.eps, target, xt, t, denoiser)
    true_target = _in_target_space(x0, noise, target, xt, t, denoiser)
    raw = elementwise_loss(pred_target, true_target, loss_type=loss_type, huber_delta=huber_delta)
    kw = {"gamma": min_snr_gamma, "sigma_data": denoiser.sigma_data}
    weight = loss_weight(schedule.logsnr(t), weighting=weighting, target=target, **kw)
    weight = weight.to(raw.device, raw.dtype)
    simple = weight * raw
    terms = {"raw": raw, "weight": weight, "simple": simple}

    # 3. hybrid loss: the bound trains the variance only (stop-gradient on the mean)
    total = simple
    if out_var is not None:
        if not isinstance(schedule, DiscreteSchedule):
            raise ValueError("the hybrid loss of a learned variance needs a DiscreteSchedule")
        frozen = torch.cat([out_mean.detach(), out_var], dim=1)
        pred_frozen = denoiser.prediction_from_output(frozen, xt, t)
        dec = decoder if decoder != "auto" else ("discretized" if x0.ndim == 4 else "gaussian")
        nats = vlb_term_from_prediction(
            pred_frozen, x0, xt, t, schedule, variance="learned", decoder=dec
        )
        dims = x0[0].numel()
        vlb = vlb_weight * schedule.T * nats / (dims * math.log(2))
        terms["vlb"] = vlb
        total = simple + vlb

    # 4. importance weights
    iw = iw.to(total.device, total.dtype)
    terms["importance_weight"] = iw
    if time_sampler is not None:
        time_sampler.update(t, total.detach())
    per_sample = iw * total
    return LossOutput(loss=per_sample.mean(), per_sample=per_sample, t=t, terms=terms)
