"""Noise schedules: the one source of alpha, sigma and log-SNR at any noise level.

A forward process adds noise as ``xt = alpha(t) * x0 + sigma(t) * eps`` with ``eps ~ N(0, I)``.
A :class:`Schedule` answers, for any (possibly fractional) time ``t``:

* ``alpha(t)``, ``sigma(t)``                 signal and noise scales;
* ``logsnr(t) = log(alpha^2 / sigma^2)``     the log signal-to-noise ratio lambda;
* ``edm_sigma(t) = sigma / alpha``           the same noise level in the variance-exploding
                                             parameterisation of EDM [Karras 2022, Eq. 4-5];
* ``t_from_logsnr(lam)``, ``t_from_edm_sigma(s)`` the inverses.

Three concrete schedules:

* :class:`DiscreteSchedule` - the discrete-time DDPM view [Ho 2020]: betas ``beta_1..beta_T`` and
  ``alpha_bar_t = prod_{s<=t} (1 - beta_s)`` (Eq. 4), indexed as in the paper: ``t = 0`` is the
  data (``alpha_bar_0 = 1``) and ``t = T`` the last step. Between integers the schedule is
  continuous: ``log alpha_bar`` is interpolated linearly in ``t`` (as DPM-Solver does for discrete
  models), so samplers may ask for any ``t`` in ``[0, T]``.
* :class:`EDMSchedule` - the variance-exploding schedule of EDM [Karras 2022]: ``alpha = 1`` and
  ``sigma = t``.
* :class:`FlowMatchSchedule` - the linear interpolant of flow matching and rectified flow
  [Lipman 2023; Liu 2023; Esser 2024]: ``alpha = 1 - t``, ``sigma = t``, t in [0, 1], ``t = 1``
  pure noise (alpha = 0, log-SNR = -inf, EDM sigma = inf), with SD3's time shift.

Everything is computed in float64; callers cast at use. Step grids for samplers (uniform,
leading, trailing, Karras rho, uniform in log-SNR) are built by :func:`sampling_timesteps`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal, get_args

import torch
from torch import Tensor

from difflab._util import F64, check_choice  # check_choice: re-exported

__all__ = [
    "BetaScheduleName",
    "BETA_SCHEDULES",
    "BETA_RANGE_SCHEDULES",
    "Spacing",
    "SPACINGS",
    "Schedule",
    "DiscreteSchedule",
    "EDMSchedule",
    "FlowMatchSchedule",
    "flux_shift",
    "make_betas",
    "rescale_zero_terminal_snr",
    "sampling_timesteps",
    "check_choice",
]

BetaScheduleName = Literal["linear", "cosine", "quadratic", "sigmoid", "sohl-dickstein"]
BETA_SCHEDULES: tuple[str, ...] = get_args(BetaScheduleName)
BETA_RANGE_SCHEDULES: tuple[str, ...] = ("linear", "quadratic", "sigmoid")  # read beta_start/end
Spacing = Literal["uniform", "leading", "trailing", "karras", "logsnr"]
SPACINGS: tuple[str, ...] = get_args(Spacing)


def _as_f64(t: Tensor | float) -> Tensor:
    return torch.as_tensor(t, dtype=F64)


# --------------------------------------------------------------------------------------------
# Beta schedules (discrete, T steps)
# --------------------------------------------------------------------------------------------


def _betas_from_alpha_bar(alpha_bar_fn, T: int, max_beta: float = 0.999) -> Tensor:
    """beta_t = 1 - alpha_bar(t) / alpha_bar(t-1), clipped [Nichol & Dhariwal 2021, Sec. 3.2]."""
    t = torch.arange(T + 1, dtype=F64)
    ab = alpha_bar_fn(t)
    return (1.0 - ab[1:] / ab[:-1]).clamp(max=max_beta)


def make_betas(
    name: BetaScheduleName,
    T: int,
    *,
    beta_start: float | None = None,
    beta_end: float | None = None,
    cosine_s: float = 0.008,
) -> Tensor:
    """Forward-process variances ``beta_1..beta_T`` as a float64 tensor of shape (T,).

    * ``linear``    [Ho 2020, Sec. 4]: linspace(1e-4, 0.02) scaled by 1000/T so that other T
      keep the same total noise [Nichol & Dhariwal 2021].
    * ``quadratic`` linspace(sqrt(beta_start), sqrt(beta_end))^2 (the DDPM code's "quad").
    * ``sigmoid``   sigmoid(linspace(-6, 6)) rescaled to [beta_start, beta_end].
    * ``cosine``    [Nichol & Dhariwal 2021, Eq. 17]: alpha_bar(t) = f(t)/f(0),
      f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), beta clipped at 0.999.
    * ``sohl-dickstein`` [Sohl-Dickstein 2015, reference code]: a baseline that destroys a
      constant fraction of the remaining signal variance per step, beta_t = 1/linspace(T, 2, T),
      bounded below by 1e-6 (plus 1e-3 on the first step) and above by 1 - 1e-5.
    """
    check_choice("beta schedule", name, BETA_SCHEDULES)
    if not isinstance(T, int) or T < 1:
        raise ValueError(f"the number of diffusion steps T must be a positive integer, got {T!r}")
    if name not in BETA_RANGE_SCHEDULES and (beta_start, beta_end) != (None, None):
        raise ValueError(f"the {name} schedule has no beta_start/beta_end")
    scale = 1000.0 / T
    b0 = beta_start if beta_start is not None else 1e-4 * scale
    b1 = beta_end if beta_end is not None else 0.02 * scale
    if name in BETA_RANGE_SCHEDULES and not b0 < b1:
        raise ValueError(f"beta_start ({b0:g}) must be below beta_end ({b1:g})")
    if name == "linear":
        betas = torch.linspace(b0, b1, T, dtype=F64)
    elif name == "quadratic":
        betas = torch.linspace(math.sqrt(b0), math.sqrt(b1), T, dtype=F64) ** 2
    elif name == "sigmoid":
        betas = torch.sigmoid(torch.linspace(-6.0, 6.0, T, dtype=F64)) * (b1 - b0) + b0
    elif name == "cosine":

        def alpha_bar(t: Tensor) -> Tensor:
            f = torch.cos((t / T + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            return f / math.cos(cosine_s / (1 + cosine_s) * math.pi / 2) ** 2

        betas = _betas_from_alpha_bar(alpha_bar, T)
    else:  # sohl-dickstein
        min_beta = torch.full((T,), 1e-6, dtype=F64)
        min_beta[0] += 1e-3
        baseline = 1.0 / torch.linspace(float(T), 2.0, T, dtype=F64) if T > 1 else torch.ones(1)
        betas = min_beta + baseline.to(F64) * (1.0 - min_beta - 1e-5)
    betas = betas.clamp(max=0.999)  # short T: the 1000/T scaling would exceed 1
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(f"{name} schedule with T={T} gives betas outside (0, 1)")
    return betas


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Rescale betas so that the last step has zero SNR [Lin 2024, Algorithm 1].

    sqrt(alpha_bar) is shifted so its last value is 0 and scaled so its first is unchanged.
    The last beta becomes 1 (alpha_bar_T = 0): the model sees pure noise at t = T.
    """
    sqrt_ab = torch.cumprod(1.0 - betas.to(F64), 0).sqrt()
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * first / (first - last)
    ab = sqrt_ab**2
    alphas = torch.cat([ab[:1], ab[1:] / ab[:-1]])
    return 1.0 - alphas


# --------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------


class Schedule(ABC):
    """A noise schedule: alpha(t), sigma(t) and log-SNR for t in [0, t_max].

    Subclasses implement :meth:`logsnr` and :meth:`t_from_logsnr`; everything else derives
    from them. ``t = 0`` is always clean data (log-SNR = +inf). ``t_min`` is the smallest
    positive time a network is trained on (1 for DDPM, sigma_min for EDM).
    """

    t_max: float
    t_min: float
    variance_preserving: bool

    @abstractmethod
    def logsnr(self, t: Tensor | float) -> Tensor:
        """lambda(t) = log(alpha^2 / sigma^2), float64, same shape as ``t``."""

    @abstractmethod
    def t_from_logsnr(self, logsnr: Tensor | float) -> Tensor:
        """Inverse of :meth:`logsnr`, float64."""

    def alpha(self, t: Tensor | float) -> Tensor:
        """Signal scale alpha(t); for VP alpha^2 = sigmoid(lambda) [Kingma 2021, Eq. 3-4]."""
        lam = self.logsnr(t)
        if self.variance_preserving:
            return torch.sigmoid(lam).sqrt()
        return torch.ones_like(lam)

    def sigma(self, t: Tensor | float) -> Tensor:
        """Noise scale sigma(t); for VP sigma^2 = sigmoid(-lambda)."""
        lam = self.logsnr(t)
        if self.variance_preserving:
            return torch.sigmoid(-lam).sqrt()
        return torch.exp(-lam / 2)

    def alpha_sigma(self, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """(alpha(t), sigma(t)) in one call."""
        return self.alpha(t), self.sigma(t)

    def edm_sigma(self, t: Tensor | float) -> Tensor:
        """EDM noise level sigma/alpha = exp(-lambda/2) of the scaled variable x/alpha."""
        return torch.exp(-self.logsnr(t) / 2)

    def t_from_edm_sigma(self, edm_sigma: Tensor | float) -> Tensor:
        """Inverse of :meth:`edm_sigma`."""
        return self.t_from_logsnr(-2.0 * torch.log(_as_f64(edm_sigma)))

    @property
    def sigma_max(self) -> float:
        """Largest EDM sigma, at t_max."""
        return float(self.edm_sigma(self.t_max))

    @property
    def sigma_min(self) -> float:
        """EDM sigma at t_min (the least noisy trained level)."""
        return float(self.edm_sigma(self.t_min))

    def to_config(self) -> dict:
        """A JSON-serialisable description; :func:`schedule_from_config` rebuilds it."""
        raise NotImplementedError


class DiscreteSchedule(Schedule):
    """The DDPM discrete-time schedule [Ho 2020], with a continuous extension.

    Notation (paper indexing, t = 0..T):

    ======================  ==========================  =======================================
    code                    paper                       meaning
    ======================  ==========================  =======================================
    ``betas[t-1]``          beta_t                      variance added at step t (t = 1..T)
    ``alphas[t-1]``         alpha_t = 1 - beta_t        Ho 2020, Eq. 4 notation
    ``alpha_bar[t]``        alpha-bar_t                 prod_{s=1}^{t} alpha_s, alpha_bar[0] = 1
    ``beta_tilde[t-1]``     beta-tilde_t                posterior variance, Eq. 7
    ======================  ==========================  =======================================

    ``alpha(t) = sqrt(alpha_bar_t)`` and ``sigma(t) = sqrt(1 - alpha_bar_t)``. For fractional
    t, log alpha_bar is interpolated linearly between the integers.
    """

    variance_preserving = True

    def __init__(self, betas: Tensor, *, name: str = "custom") -> None:
        betas = torch.as_tensor(betas, dtype=F64).flatten()
        if betas.numel() < 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a non-empty 1-D tensor with values in (0, 1]")
        self.name = name
        self.T = betas.numel()
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alpha_bar = torch.cat([torch.ones(1, dtype=F64), torch.cumprod(self.alphas, 0)])
        # Eq. (7) [Ho 2020]: beta-tilde_t = (1 - alpha_bar_{t-1}) / (1 - alpha_bar_t) * beta_t
        self.beta_tilde = (1 - self.alpha_bar[:-1]) / (1 - self.alpha_bar[1:]) * betas
        # (T+1,), strictly decreasing; floored at 1e-20 so a zero-terminal-SNR schedule
        # (alpha_bar_T = 0) stays finite when interpolated
        self._log_ab = torch.log(self.alpha_bar.clamp(min=1e-20))
        self.t_max = float(self.T)
        self.t_min = 1.0
        self._config: dict = {"type": "discrete", "name": name, "T": self.T}

    @classmethod
    def from_name(
        cls,
        name: BetaScheduleName,
        T: int = 1000,
        *,
        zero_terminal_snr: bool = False,
        **kwargs: float,
    ) -> DiscreteSchedule:
        """Build from a named beta schedule (see :func:`make_betas`)."""
        betas = make_betas(name, T, **kwargs)
        if zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        sched = cls(betas, name=name)
        sched._config = {
            "type": "discrete",
            "name": name,
            "T": T,
            "zero_terminal_snr": zero_terminal_snr,
            **kwargs,
        }
        return sched

    def to_config(self) -> dict:
        if self.name == "custom":
            return {"type": "discrete", "name": "custom", "betas": self.betas.tolist()}
        return dict(self._config)

    def log_alpha_bar(self, t: Tensor | float) -> Tensor:
        """log alpha_bar(t), linear in t between integer steps; t in [0, T]."""
        t = _as_f64(t)
        if bool(((t < 0) | (t > self.T)).any()):
            raise ValueError(f"t must lie in [0, {self.T}]")
        lo = t.floor().clamp(0, self.T - 1).long()
        frac = t - lo.to(F64)
        return (1 - frac) * self._log_ab[lo] + frac * self._log_ab[lo + 1]

    def logsnr(self, t: Tensor | float) -> Tensor:
        lab = self.log_alpha_bar(t)
        # lambda = log(ab / (1 - ab)), computed stably; +inf at t = 0
        return lab - torch.log(-torch.expm1(lab))

    def alpha(self, t: Tensor | float) -> Tensor:
        return torch.exp(self.log_alpha_bar(t) / 2)

    def sigma(self, t: Tensor | float) -> Tensor:
        return torch.sqrt(-torch.expm1(self.log_alpha_bar(t)))

    def t_from_logsnr(self, logsnr: Tensor | float) -> Tensor:
        lam = _as_f64(logsnr)
        # log alpha_bar = log sigmoid(lambda); invert the piecewise-linear log alpha_bar(t)
        lab = torch.nn.functional.logsigmoid(lam).clamp(min=float(self._log_ab[-1]))
        neg = -self._log_ab  # increasing
        hi = torch.searchsorted(neg, (-lab).contiguous()).clamp(1, self.T)
        lo = hi - 1
        span = neg[hi] - neg[lo]
        frac = ((-lab) - neg[lo]) / span
        return lo.to(F64) + frac.clamp(0, 1)

    def __repr__(self) -> str:
        return f"DiscreteSchedule(name={self.name!r}, T={self.T})"


class EDMSchedule(Schedule):
    """Variance-exploding schedule of EDM [Karras 2022, Table 1]: alpha = 1, sigma(t) = t.

    Trained noise levels lie in [sigma_min, sigma_max] (0.002 and 80 in the paper).
    """

    variance_preserving = False

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError("EDM schedule needs 0 < sigma_min < sigma_max")
        self.t_min = float(sigma_min)
        self.t_max = float(sigma_max)

    def logsnr(self, t: Tensor | float) -> Tensor:
        return -2.0 * torch.log(_as_f64(t))

    def t_from_logsnr(self, logsnr: Tensor | float) -> Tensor:
        return torch.exp(-_as_f64(logsnr) / 2)

    def to_config(self) -> dict:
        return {"type": "edm", "sigma_min": self.t_min, "sigma_max": self.t_max}

    def __repr__(self) -> str:
        return f"EDMSchedule(sigma_min={self.t_min}, sigma_max={self.t_max})"


def flux_shift(
    image_seq_len: int,
    *,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The resolution-dependent time shift of Flux: exp(mu), mu linear in the sequence length.

    mu = base_shift + (max_shift - base_shift) (L - base_seq_len) / (max_seq_len - base_seq_len)
    for an image of L latent tokens (patches); Flux's exponential shift
    t' = e^mu / (e^mu + (1 / t - 1)) is SD3's shift with s = e^mu (see
    :meth:`FlowMatchSchedule.shift_time`), so a Flux schedule is
    ``FlowMatchSchedule(shift=flux_shift(L))``. The defaults are Flux's (diffusers'
    ``calculate_shift``): mu = 0.5 at 256 tokens, 1.15 at 4096.
    """
    if not isinstance(image_seq_len, int) or image_seq_len < 1:
        raise ValueError(f"image_seq_len must be a positive integer, got {image_seq_len!r}")
    if not base_seq_len < max_seq_len:
        raise ValueError(f"base_seq_len ({base_seq_len}) must be below max_seq_len ({max_seq_len})")
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    mu = base_shift + slope * (image_seq_len - base_seq_len)
    return math.exp(mu)


class FlowMatchSchedule(Schedule):
    """The linear interpolant of flow matching [Lipman 2023, Eq. 23 with sigma_min = 0] and
    rectified flow [Liu 2023, Eq. 1]: x_t = (1 - t) x0 + t eps, t in [0, 1].

    ======================  ===================================  ==============================
    code                    value                                note
    ======================  ===================================  ==============================
    ``alpha(t)``            1 - t                                0 at t = 1 (pure noise)
    ``sigma(t)``            t
    ``logsnr(t)``           2 log((1 - t) / t)                   -inf at t = 1, +inf at t = 0
    ``edm_sigma(t)``        t / (1 - t)                          inf at t = 1
    ``t_from_edm_sigma(s)`` s / (1 + s)                          1 at s = inf
    ``shift_time(t)``       s t / (1 + (s - 1) t)                [Esser 2024, Eq. 23], s=shift
    ======================  ===================================  ==============================

    Time runs as in diffusion and in diffusers: t = 0 is data, t = 1 is noise (torchcfm and
    rectified-flow-pytorch use the opposite direction, 1 - t). The network sees t itself
    (diffusers feeds it 1000 t). t = 1 is a valid time: a grid may start there and every
    sampler takes its first step from pure noise (the samplers that work in log-SNR or in EDM
    sigma take that step in its closed form, the limit of their update).

    ``shift`` is SD3's time shift [Esser 2024, Sec. 5.3.2]: it moves the sampling grids
    (:func:`sampling_timesteps`, trailing and uniform spacing) and the training times
    (:func:`difflab.objectives.sample_flow_times`) towards noise, t -> shift_time(t); alpha and
    sigma at a given t do not change. It multiplies the EDM sigma by ``shift``, i.e. lowers the
    log-SNR by 2 log(shift). Flux's resolution-dependent shift is ``shift = flux_shift(L)``.

    Args:
        shift: SD3's shift s > 0 (1: none; SD3 uses 3 at 1024 px).
        t_min: the smallest time of a sampling grid before the final t = 0, and the default
            start of the likelihood ODE (training uses all of (0, 1)).
    """

    variance_preserving = False

    def __init__(self, *, shift: float = 1.0, t_min: float = 1e-3) -> None:
        if not (math.isfinite(shift) and shift > 0):
            raise ValueError(f"the time shift must be a positive number, got {shift!r}")
        if not 0 < t_min < 1:
            raise ValueError(f"t_min must lie in (0, 1), got {t_min!r}")
        self.shift = float(shift)
        self.t_min = float(t_min)
        self.t_max = 1.0

    def _t(self, t: Tensor | float) -> Tensor:
        t = _as_f64(t)
        if bool(((t < 0) | (t > 1)).any()):
            raise ValueError("t must lie in [0, 1] for the flow-matching schedule")
        return t

    def alpha(self, t: Tensor | float) -> Tensor:
        return 1.0 - self._t(t)

    def sigma(self, t: Tensor | float) -> Tensor:
        return self._t(t).clone()

    def logsnr(self, t: Tensor | float) -> Tensor:
        t = self._t(t)
        return 2.0 * (torch.log1p(-t) - torch.log(t))  # log(0) = -inf at t = 1, +inf at t = 0

    def t_from_logsnr(self, logsnr: Tensor | float) -> Tensor:
        return torch.sigmoid(-_as_f64(logsnr) / 2)  # t = s / (1 + s), s = exp(-lambda / 2)

    def edm_sigma(self, t: Tensor | float) -> Tensor:
        t = self._t(t)
        return t / (1.0 - t)  # inf at t = 1

    def t_from_edm_sigma(self, edm_sigma: Tensor | float) -> Tensor:
        s = _as_f64(edm_sigma)
        return torch.where(torch.isinf(s), torch.ones_like(s), s / (1.0 + s))

    def shift_time(self, t: Tensor | float) -> Tensor:
        """SD3's shift t' = s t / (1 + (s - 1) t) [Esser 2024, Eq. 23 with s = sqrt(m / n)];
        t'/(1 - t') = s t/(1 - t), so 0 and 1 stay fixed and the EDM sigma is scaled by s."""
        t = self._t(t)
        return self.shift * t / (self.shift * t + (1.0 - t))  # = 1 exactly at t = 1

    def unshift_time(self, t: Tensor | float) -> Tensor:
        """Inverse of :meth:`shift_time`: t = t' / (t' + s (1 - t'))."""
        t = self._t(t)
        return t / (t + self.shift * (1.0 - t))

    def to_config(self) -> dict:
        return {"type": "flow", "shift": self.shift, "t_min": self.t_min}

    def __repr__(self) -> str:
        return f"FlowMatchSchedule(shift={self.shift}, t_min={self.t_min})"


def schedule_from_config(config: dict) -> Schedule:
    """Rebuild a schedule from :meth:`Schedule.to_config`."""
    kind = config.get("type")
    if kind == "edm":
        return EDMSchedule(config["sigma_min"], config["sigma_max"])
    if kind == "flow":
        return FlowMatchSchedule(shift=config["shift"], t_min=config["t_min"])
    if kind == "discrete":
        if config.get("name") == "custom":
            return DiscreteSchedule(torch.tensor(config["betas"], dtype=F64))
        extra = {k: v for k, v in config.items() if k not in ("type", "name", "T")}
        return DiscreteSchedule.from_name(config["name"], config["T"], **extra)
    raise ValueError(f"unknown schedule type {kind!r}; choose one of: discrete, edm, flow")


__all__.append("schedule_from_config")


# --------------------------------------------------------------------------------------------
# Step grids for samplers
# --------------------------------------------------------------------------------------------


def sampling_timesteps(
    schedule: Schedule,
    steps: int,
    *,
    spacing: Spacing = "trailing",
    rho: float = 7.0,
    t_start: float | None = None,
) -> Tensor:
    """A decreasing grid of ``steps + 1`` times ``t_0 > t_1 > ... > t_steps = 0``, float64.

    The sampler takes ``steps`` steps and calls the network at the first ``steps`` times.

    * ``trailing``  [Lin 2024, Table 2]: t_max, t_max - t_max/N, ..., t_max/N (rounded to
      integers for a discrete schedule). Starts at the most noisy level.
    * ``leading``   [Song 2021 (DDIM) code]: 1 + k * (T // N) for k = N-1..0; does not reach T.
    * ``uniform``   linspace(t_max, t_min, N) (rounded for a discrete schedule).
    * ``karras``    [Karras 2022, Eq. 5]: sigma_i = (sigma_max^(1/rho) + i/(N-1)
      (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho in EDM sigma, mapped back to t.
    * ``logsnr``    uniform in log-SNR between t_max and t_min [Lu 2022 (DPM-Solver)].

    ``t_start`` (default t_max) starts the grid lower, e.g. for image-to-image (SDEdit).

    On a :class:`FlowMatchSchedule` the trailing and uniform grids are built in the unshifted
    time and mapped through ``shift_time`` (their ends stay where they are): trailing is then
    SD3's and Flux's grid shift(1, 1 - 1/N, ..., 1/N), 0. Karras and log-SNR grids need a
    finite top level, so on that schedule they need ``t_start < 1``.
    """
    check_choice("spacing", spacing, SPACINGS)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    t_hi = schedule.t_max if t_start is None else float(t_start)
    t_lo = schedule.t_min
    if not t_lo <= t_hi <= schedule.t_max:
        raise ValueError(f"t_start must lie in [{t_lo}, {schedule.t_max}], got {t_hi}")
    discrete = isinstance(schedule, DiscreteSchedule)
    # on the flow-matching schedule the uniform-in-t grids are built in the unshifted time
    warp = isinstance(schedule, FlowMatchSchedule) and spacing in ("trailing", "uniform")
    u_hi, u_lo = (t_hi, t_lo)
    if warp:
        u_hi, u_lo = float(schedule.unshift_time(t_hi)), float(schedule.unshift_time(t_lo))
    if spacing in ("karras", "logsnr") and math.isinf(float(schedule.edm_sigma(t_hi))):
        raise ValueError(
            f"{spacing} spacing needs a finite top noise level; this schedule is pure noise at "
            f"t = {t_hi:g}: use trailing or uniform spacing, or t_start below it"
        )
    if spacing == "trailing":
        ts = u_hi - torch.arange(steps, dtype=F64) * (u_hi / steps)
        ts = ts.clamp(min=u_lo)
    elif spacing == "leading":
        if not discrete:
            raise ValueError("leading spacing is defined for discrete schedules only")
        stride = max(int(t_hi) // steps, 1)
        ts = (1 + torch.arange(steps - 1, -1, -1, dtype=F64) * stride).clamp(max=t_hi)
    elif spacing == "uniform":
        ts = torch.linspace(u_hi, u_lo, steps, dtype=F64)
    elif spacing == "karras":
        s_hi = float(schedule.edm_sigma(t_hi))
        s_lo = schedule.sigma_min
        ramp = torch.linspace(0, 1, steps, dtype=F64)
        sig = (s_hi ** (1 / rho) + ramp * (s_lo ** (1 / rho) - s_hi ** (1 / rho))) ** rho
        ts = schedule.t_from_edm_sigma(sig)
    else:  # logsnr
        lam = torch.linspace(
            float(schedule.logsnr(t_hi)), float(schedule.logsnr(t_lo)), steps, dtype=F64
        )
        ts = schedule.t_from_logsnr(lam)
    if discrete and spacing in ("trailing", "uniform"):
        ts = ts.round()
    if warp:
        ts = schedule.shift_time(ts.clamp(0, 1))  # type: ignore[attr-defined]
    if steps == 1:
        ts = torch.tensor([t_hi], dtype=F64)
    ts = ts.clamp(t_lo, schedule.t_max)
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError(
            f"{steps} steps with {spacing} spacing give repeated times on this schedule; "
            "use fewer steps or another spacing"
        )
    return torch.cat([ts, torch.zeros(1, dtype=F64)])
