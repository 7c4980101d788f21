"""The diffusion probabilistic model of Sohl-Dickstein et al. 2015, for low-dimensional data.

Forward process: T = 40 Gaussian steps q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I)
with the paper's "destroy a constant fraction of the remaining signal" schedule (``make_betas(
"sohl-dickstein", T)``). Reverse process, as in the reference code (``get_mu_sigma``):

* a network maps x_t (B, D) to features Z (B, D, 2, K) -- the same weights for every step;
* a bump basis of K Gaussian functions of t (``temporal_basis``) reads Z out into per-dimension
  mu_coeff and beta_coeff at step t (``temporal_readout``);
* mean     mu_t  = x_t sqrt(1 - beta_t) + mu_coeff sqrt(beta_t)
* variance S_t   = sigmoid(beta_coeff / sqrt(T) + logit(beta_t))

so a zero network is the exact reverse of the forward chain for N(0, I) data.

Training maximises the bound of Eq. 14 [Sohl-Dickstein 2015, App. B]:

    K = -sum_{t=2}^T E_q KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
        + H_q(X_T | X0) - H_q(X_1 | X0) - H_p(X_T),

where the first reverse step is fixed to the forward step's reversal under N(0, I)
(App. B.2). The sum is estimated with one step t ~ U{2..T} per sample times (T - 1), an
unbiased estimate (the reference code multiplies by T). As in the paper, the bound is reported
in bits per dimension relative to an isotropic unit Gaussian; it assumes data scaled to unit
variance, for which H_p(X_T) is the entropy of N(0, 1) and a zero network scores exactly 0.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from difflab._util import F64
from difflab.likelihood import normal_kl
from difflab.process import q_posterior, q_step
from difflab.schedules import DiscreteSchedule

__all__ = ["SohlDicksteinModel", "temporal_basis"]

_H_UNIT_GAUSS = 0.5 * (1 + math.log(2 * math.pi))  # entropy of N(0, 1) per dimension


def temporal_basis(T: int, n_basis: int) -> Tensor:
    """Bump basis (n_basis, T), float64: Gaussians in t with centres evenly spaced over the
    trajectory and width half their spacing, normalised to sum to one at each t (reference
    code, ``generate_temporal_basis``)."""
    if n_basis < 2:
        raise ValueError(f"n_temporal_basis must be >= 2, got {n_basis}")
    xx = torch.linspace(-1, 1, T, dtype=F64)
    centres = torch.linspace(-1, 1, n_basis, dtype=F64)
    width = (centres[1] - centres[0]) / 2
    basis = torch.exp(-((xx[:, None] - centres[None, :]) ** 2) / (2 * width**2))
    return (basis / basis.sum(1, keepdim=True)).T.contiguous()


class SohlDicksteinModel(nn.Module):
    """Sohl-Dickstein 2015 diffusion model for data (B, dim).

    Args:
        dim: data dimension.
        T: trajectory length (40 in the paper).
        n_temporal_basis: number K of bump functions (10 in the reference code).
        hidden, depth: width and number of hidden layers of the default MLP (leaky ReLU, as
            the reference code's dense layers); its readout layer starts at zero, i.e. at the
            isotropic-Gaussian model.
        network: optional replacement, a module mapping (B, dim) to (B, dim * 2 * K).
    """

    def __init__(
        self,
        dim: int = 2,
        *,
        T: int = 40,
        n_temporal_basis: int = 10,
        hidden: int = 128,
        depth: int = 2,
        network: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if dim < 1 or T < 2:
            raise ValueError(f"need dim >= 1 and T >= 2, got dim={dim}, T={T}")
        self.dim, self.T, self.n_basis = dim, T, n_temporal_basis
        self.schedule = DiscreteSchedule.from_name("sohl-dickstein", T)
        # float64 buffers, cast to the data's dtype at use
        self.register_buffer("betas", self.schedule.betas.clone())
        self.register_buffer("temporal_basis", temporal_basis(T, n_temporal_basis))
        if network is None:
            layers: list[nn.Module] = []
            width = dim
            for _ in range(depth):
                layers += [nn.Linear(width, hidden), nn.LeakyReLU()]
                width = hidden
            readout = nn.Linear(width, dim * 2 * n_temporal_basis)
            nn.init.zeros_(readout.weight)
            nn.init.zeros_(readout.bias)
            network = nn.Sequential(*layers, readout)
        self.network = network

    def _steps(self, t: Tensor | int, batch: int) -> Tensor:
        t = torch.as_tensor(t).detach().cpu()
        t = t.expand(batch) if t.ndim == 0 else t
        if t.shape != (batch,) or bool(((t != t.round()) | (t < 1) | (t > self.T)).any()):
            raise ValueError(f"t must hold integer steps in 1..{self.T}, scalar or ({batch},)")
        return t.long()

    def reverse_mean_var(self, xt: Tensor, t: Tensor | int) -> tuple[Tensor, Tensor]:
        """Mean and variance (each (B, dim)) of p(x_{t-1} | x_t) at integer steps t in 1..T."""
        if xt.ndim != 2 or xt.shape[1] != self.dim:
            raise ValueError(f"xt must have shape (B, {self.dim}), got {tuple(xt.shape)}")
        idx = self._steps(t, xt.shape[0]).to(xt.device) - 1
        z = self.network(xt)
        if z.shape != (xt.shape[0], self.dim * 2 * self.n_basis):
            raise ValueError(
                f"network output must have shape (B, {self.dim * 2 * self.n_basis}), "
                f"got {tuple(z.shape)}"
            )
        z = z.reshape(-1, self.dim, 2, self.n_basis)
        weights = self.temporal_basis[:, idx].T.to(z.dtype)  # (B, K)
        coeff = torch.einsum("bdck,bk->bdc", z, weights)
        mu_coeff, beta_coeff = coeff[..., 0], coeff[..., 1]
        beta = self.betas[idx].to(xt.dtype)[:, None]
        # reverse kernel as a perturbation of the forward one [Sohl-Dickstein 2015, Sec. 2.2]
        mean = xt * torch.sqrt(1 - beta) + mu_coeff * torch.sqrt(beta)
        var = torch.sigmoid(beta_coeff / math.sqrt(self.T) + torch.logit(beta))
        return mean, var

    def nll_bound(
        self,
        x0: Tensor,
        generator: torch.Generator | None = None,
        *,
        t: Tensor | int | None = None,
        full: bool = False,
    ) -> Tensor:
        """-K per sample (B,), nats summed over dimensions [Sohl-Dickstein 2015, Eq. 14].

        One step t ~ U{2..T} per sample (or the given ``t``), scaled by T - 1; with ``full``
        the sum over all steps t = 2..T (fresh x_t for each).
        """
        b = x0.shape[0]
        if full:
            steps = [torch.full((b,), s) for s in range(2, self.T + 1)]
            kl = sum(self._kl(x0, s, generator) for s in steps)
        else:
            if t is None:
                t = torch.randint(2, self.T + 1, (b,), generator=generator)
            t = self._steps(t, b)
            if bool((t < 2).any()):
                raise ValueError("the bound's KL terms are defined for t = 2..T")
            kl = (self.T - 1) * self._kl(x0, t, generator)
        ab_T = float(self.schedule.alpha_bar[-1])
        h_start = _H_UNIT_GAUSS + 0.5 * math.log(float(self.schedule.betas[0]))  # H_q(X1|X0)
        h_end = _H_UNIT_GAUSS + 0.5 * math.log(1 - ab_T)  # H_q(X_T|X0)
        h_prior = _H_UNIT_GAUSS  # H_p(X_T), p(x_T) = N(0, I)
        return kl + self.dim * (h_start - h_end + h_prior)  # Eq. (14) [Sohl-Dickstein 2015]

    def _kl(self, x0: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """KL(q(x_{t-1}|x_t, x0) || p(x_{t-1}|x_t)) summed over dims, x_t ~ q(x_t|x0); (B,)."""
        ab = self.schedule.alpha_bar[t].to(x0.dtype)[:, None].to(x0.device)
        eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # q(x_t | x0), Eq. (4) [Ho 2020]
        mean_q, var_q = q_posterior(x0, xt, t, t - 1, self.schedule)
        mean_p, var_p = self.reverse_mean_var(xt, t)
        return normal_kl(mean_q, var_q.log(), mean_p, var_p.log()).sum(1)

    def relative_bits_per_dim(self, nll_nats: Tensor) -> Tensor:
        """(-K - L_null) / (dim ln 2): bits/dim relative to N(0, I); negative is better."""
        return (nll_nats - self.dim * _H_UNIT_GAUSS) / (self.dim * math.log(2))

    def loss(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Training loss: the one-step bound estimate in bits/dim relative to N(0, I), a scalar."""
        return self.relative_bits_per_dim(self.nll_bound(x0, generator)).mean()

    @torch.no_grad()
    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        return_trajectory: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Ancestral sampling x_T ~ N(0, I), x_{t-1} ~ p(x_{t-1} | x_t) for t = T..1.

        Every step uses the network, as the reference sampler does. Returns x0 (n, dim) and,
        with ``return_trajectory``, also (T + 1, n, dim) with ``traj[t] = x_t``.
        """
        param = next(self.parameters(), None)
        dtype = param.dtype if param is not None else torch.get_default_dtype()
        device = self.betas.device
        x = torch.randn(n, self.dim, generator=generator).to(device, dtype)
        traj = [x]
        for t in range(self.T, 0, -1):
            mean, var = self.reverse_mean_var(x, t)
            z = torch.randn(n, self.dim, generator=generator).to(device, dtype)
            x = mean + var.sqrt() * z
            traj.append(x)
        if return_trajectory:
            return x, torch.stack(traj[::-1])
        return x

    @torch.no_grad()
    def forward_trajectory(self, x0: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The forward Markov chain from x0 (B, dim): (T + 1, B, dim) with ``traj[t] = x_t``."""
        traj = [x0]
        for t in range(1, self.T + 1):
            traj.append(q_step(traj[-1], t, self.schedule, generator=generator))
        return torch.stack(traj)
