"""2-D toy datasets and a Gaussian mixture with exact density and exact denoiser.

Every toy dataset is a float32 tensor of shape (n, 2) whose law has mean exactly zero and
coordinates of order one (Var: per-coordinate variance of the law, Cov: covariance):

- ``swissroll``: t ~ U(1.5 pi, 4.5 pi), point ((t cos t - 2) / 6, (t sin t - 2 / (3 pi)) / 6)
  + 0.1 N(0, I); the shifts are the exact means of the curve. Var ~ (1.228, 1.352), Cov ~ 0.119.
- ``moons``: half the points on (cos u, sin u), half on (1 - cos u, 1/2 - sin u), u ~ U(0, pi),
  shifted by -(1/2, 1/4) (the exact mean), + 0.1 N(0, I).
  Var = (0.76, 0.5725 - 1/pi ~ 0.254), Cov = 1/8 - 1/pi ~ -0.193.
- ``8gaussians``: equal mixture of N(m_k, 0.15^2 I), m_k = 1.5 (cos(k pi/4), sin(k pi/4)).
  Var = 1.5^2 / 2 + 0.15^2 = 1.1475 per coordinate, Cov = 0.
- ``checkerboard``: uniform on the 8 unit squares [i, i+1) x [j, j+1) in [-2, 2]^2 with i + j
  even. Var = 4/3 per coordinate, Cov = 1/4.
- ``gmm``: ``default_gmm()``, 5 anisotropic components with unequal weights.
  Var ~ (1.384, 0.946), Cov ~ 0.162 (exactly ``default_gmm().covariance()``).

``GaussianMixture`` gives the exact log-density of any mixture (any dimension D), its law after
the forward process x_t = alpha x_0 + sigma eps (``noised``) and the optimal denoiser
E[x_0 | x_t] in closed form (``x0_posterior_mean``), which the sampler tests use as an oracle.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from difflab._util import F64

__all__ = [
    "TOY_DATASETS",
    "TOY_SOURCES",
    "GaussianMixture",
    "ToyName",
    "default_gmm",
    "eight_gaussians_gmm",
    "sample_toy",
    "toy_density",
]

# the names of TOY_SOURCES, for type checkers (tests/test_toy_data.py keeps the two equal)
ToyName = Literal["swissroll", "moons", "8gaussians", "checkerboard", "gmm"]

ScalarOrBatch = float | Tensor


def _batch_param(value: ScalarOrBatch, n: int, name: str, device: torch.device) -> Tensor:
    """Turn a float, a 0-dim tensor or an (n,) tensor into an (n,) float64 tensor."""
    v = torch.as_tensor(value, dtype=F64, device=device)
    if v.numel() == 1:
        return v.reshape(1).expand(n)
    if v.numel() == n:
        return v.reshape(n)
    raise ValueError(
        f"{name} must be a float, a 0-dim tensor or have n={n} elements, got shape {tuple(v.shape)}"
    )


class GaussianMixture:
    """Mixture of K Gaussians in D dimensions, p(x) = sum_k w_k N(x; mu_k, Sigma_k).

    Parameters are stored in float64 on the CPU: ``weights`` (K,) (normalised to sum to one),
    ``means`` (K, D), ``covariances`` (K, D, D) (symmetric positive definite). Methods accept
    inputs on any device and return results in the dtype and on the device of the input.
    """

    def __init__(self, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        w = torch.as_tensor(weights, dtype=F64).detach().cpu()
        mu = torch.as_tensor(means, dtype=F64).detach().cpu()
        cov = torch.as_tensor(covariances, dtype=F64).detach().cpu()
        if w.ndim != 1 or mu.ndim != 2 or cov.ndim != 3:
            raise ValueError(
                "expected weights (K,), means (K, D), covariances (K, D, D); got "
                f"{tuple(w.shape)}, {tuple(mu.shape)}, {tuple(cov.shape)}"
            )
        k, d = mu.shape
        if w.shape[0] != k or cov.shape != (k, d, d) or k == 0 or d == 0:
            raise ValueError(
                "inconsistent shapes: weights (K,), means (K, D), covariances "
                f"(K, D, D) expected, got {tuple(w.shape)}, {tuple(mu.shape)}, "
                f"{tuple(cov.shape)}"
            )
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be finite, non-negative and not all zero, got {w}")
        if not torch.allclose(cov, cov.transpose(-1, -2), rtol=1e-10, atol=1e-12):
            raise ValueError("covariances must be symmetric")
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        eigvals, eigvecs = torch.linalg.eigh(cov)
        bad = (eigvals <= 0).any(dim=-1).nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"covariances of components {bad} are not positive definite")
        self.weights = w / w.sum()
        self.means = mu
        self.covariances = cov
        self._eigvals = eigvals  # (K, D): Sigma_k = U_k diag(eigvals_k) U_k^T
        self._eigvecs = eigvecs  # (K, D, D)
        self._chol = torch.linalg.cholesky(cov)  # (K, D, D), used for sampling

    @classmethod
    def isotropic(cls, means: Tensor, std: float | Tensor, weights: Tensor | None = None):
        """Mixture of N(mu_k, std_k^2 I); ``std`` a float or (K,); equal weights by default."""
        mu = torch.as_tensor(means, dtype=F64)
        k, d = mu.shape
        s = torch.as_tensor(std, dtype=F64).expand(k)
        w = torch.full((k,), 1.0 / k, dtype=F64) if weights is None else weights
        cov = s[:, None, None] ** 2 * torch.eye(d, dtype=F64).expand(k, d, d)
        return cls(w, mu, cov)

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def __repr__(self) -> str:
        return f"GaussianMixture(num_components={self.num_components}, dim={self.dim})"

    def mean(self) -> Tensor:
        """E[x] = sum_k w_k mu_k, shape (D,), float64."""
        return self.weights @ self.means

    def covariance(self) -> Tensor:
        """Cov[x] = sum_k w_k (Sigma_k + mu_k mu_k^T) - E[x] E[x]^T, shape (D, D), float64."""
        m = self.mean()
        second = self.covariances + self.means[:, :, None] * self.means[:, None, :]
        return torch.einsum("k,kij->ij", self.weights, second) - torch.outer(m, m)

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """Draw n samples (n, D): k ~ Categorical(w), x = mu_k + L_k eps, L_k L_k^T = Sigma_k."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if n == 0:
            return torch.empty(0, self.dim, dtype=dtype)
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, dtype=F64, generator=generator)
        x = self.means[k] + torch.einsum("nij,nj->ni", self._chol[k], eps)
        return x.to(dtype)

    def noised(self, alpha: float, sigma: float) -> GaussianMixture:
        """Law of x_t = alpha x_0 + sigma eps, eps ~ N(0, I), for x_0 from this mixture.

        Each component maps to N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I); weights unchanged.
        This is the marginal q(x_t) of Eq. (4) [Ho 2020] for Gaussian-mixture data.
        """
        eye = torch.eye(self.dim, dtype=F64)
        cov = alpha**2 * self.covariances + sigma**2 * eye  # Eq. (4) [Ho 2020], per component
        return GaussianMixture(self.weights, alpha * self.means, cov)

    def _terms(self, x: Tensor, alpha: ScalarOrBatch, sigma: ScalarOrBatch):
        """Per-component log N(x; alpha mu_k, C_k) and C_k^{-1} (x - alpha mu_k), where
        C_k = alpha^2 Sigma_k + sigma^2 I.

        Works in each component's eigenbasis, where C_k = U_k diag(alpha^2 lambda_k + sigma^2)
        U_k^T is diagonal, so per-sample alpha and sigma cost O(n K D^2). Returns log_n (n, K),
        c_inv_diff (n, K, D) expressed in the eigenbasis, and alpha (n,), all float64.
        """
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected x of shape (n, {self.dim}), got {tuple(x.shape)}")
        dev = x.device
        n = x.shape[0]
        a = _batch_param(alpha, n, "alpha", dev)
        s = _batch_param(sigma, n, "sigma", dev)
        mu, lam, u = self.means.to(dev), self._eigvals.to(dev), self._eigvecs.to(dev)
        diff = x.to(F64)[:, None, :] - a[:, None, None] * mu  # (n, K, D)
        d = torch.einsum("kji,nkj->nki", u, diff)  # U_k^T diff
        var = a[:, None, None] ** 2 * lam + s[:, None, None] ** 2  # (n, K, D)
        maha = (d**2 / var).sum(-1)
        log_n = -0.5 * (self.dim * math.log(2 * math.pi) + var.log().sum(-1) + maha)
        return log_n, d / var, a

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log p(x) = logsumexp_k [log w_k + log N(x; mu_k, Sigma_k)]; x (n, D) -> (n,)."""
        log_n, _, _ = self._terms(x, 1.0, 0.0)
        log_w = self.weights.to(x.device).log()
        return torch.logsumexp(log_w + log_n, dim=1).to(x.dtype)

    def score(self, x: Tensor) -> Tensor:
        """grad_x log p(x) = -sum_k r_k(x) Sigma_k^{-1} (x - mu_k); x (n, D) -> (n, D)."""
        log_n, c_inv_diff, _ = self._terms(x, 1.0, 0.0)
        r = torch.softmax(self.weights.to(x.device).log() + log_n, dim=1)  # (n, K)
        grad = -torch.einsum("kij,nkj->nki", self._eigvecs.to(x.device), c_inv_diff)
        return (r[:, :, None] * grad).sum(1).to(x.dtype)

    def x0_posterior_mean(self, xt: Tensor, alpha: ScalarOrBatch, sigma: ScalarOrBatch) -> Tensor:
        """E[x_0 | x_t] for x_t = alpha x_0 + sigma eps: the optimal (MMSE) denoiser.

        By Bayes' rule, with C_k = alpha^2 Sigma_k + sigma^2 I,
            r_k(x_t) = w_k N(x_t; alpha mu_k, C_k) / sum_j w_j N(x_t; alpha mu_j, C_j),
            E[x_0 | x_t, k] = mu_k + alpha Sigma_k C_k^{-1} (x_t - alpha mu_k),
            E[x_0 | x_t] = sum_k r_k(x_t) E[x_0 | x_t, k].
        xt (n, D); alpha, sigma floats, 0-dim or (n,) tensors. Returns (n, D) in xt's dtype.
        """
        log_n, c_inv_diff, a = self._terms(xt, alpha, sigma)
        dev = xt.device
        r = torch.softmax(self.weights.to(dev).log() + log_n, dim=1)  # (n, K)
        lam, u = self._eigvals.to(dev), self._eigvecs.to(dev)
        gain = torch.einsum("kij,nkj->nki", u, lam * c_inv_diff)  # Sigma_k C_k^{-1} diff
        cond_mean = self.means.to(dev) + a[:, None, None] * gain  # (n, K, D)
        return (r[:, :, None] * cond_mean).sum(1).to(xt.dtype)


def eight_gaussians_gmm() -> GaussianMixture:
    """The ``8gaussians`` law: equal mixture of N(1.5 (cos(k pi/4), sin(k pi/4)), 0.15^2 I)."""
    angles = torch.arange(8, dtype=F64) * (math.pi / 4)
    means = 1.5 * torch.stack([angles.cos(), angles.sin()], dim=1)
    return GaussianMixture.isotropic(means, 0.15)


# weight, mean (before centring), std along the major axis, std along the minor axis, angle (deg)
_GMM_LAYOUT = (
    (0.30, (-1.2, -0.8), 0.45, 0.15, 30.0),
    (0.20, (1.3, -0.6), 0.35, 0.20, -45.0),
    (0.20, (0.0, 1.3), 0.50, 0.12, 0.0),
    (0.15, (-1.4, 1.0), 0.20, 0.20, 0.0),
    (0.15, (1.2, 1.1), 0.30, 0.10, 90.0),
)


def default_gmm() -> GaussianMixture:
    """The ``gmm`` law: 5 anisotropic 2-D components with unequal weights (``_GMM_LAYOUT``).

    Component k has covariance R(theta_k) diag(s_major^2, s_minor^2) R(theta_k)^T; all means are
    shifted by the same vector so that the mixture mean is exactly zero.
    """
    w = torch.tensor([row[0] for row in _GMM_LAYOUT], dtype=F64)
    mu = torch.tensor([row[1] for row in _GMM_LAYOUT], dtype=F64)
    covs = []
    for _, _, s_major, s_minor, deg in _GMM_LAYOUT:
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        rot = torch.tensor([[c, -s], [s, c]], dtype=F64)
        covs.append(rot @ torch.diag(torch.tensor([s_major**2, s_minor**2], dtype=F64)) @ rot.T)
    mu = mu - (w / w.sum()) @ mu
    return GaussianMixture(w, mu, torch.stack(covs))


def toy_density(name: Literal["8gaussians", "gmm"]) -> GaussianMixture:
    """The exact density of a toy dataset, for those that have one (``8gaussians``, ``gmm``)."""
    if name == "8gaussians":
        return eight_gaussians_gmm()
    if name == "gmm":
        return default_gmm()
    raise ValueError(
        f"no closed-form density for toy dataset {name!r}; valid options: '8gaussians', 'gmm'"
    )


def _swissroll(n: int, g: torch.Generator | None) -> Tensor:
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, dtype=F64, generator=g))
    curve = torch.stack([t * t.cos() - 2.0, t * t.sin() - 2.0 / (3 * math.pi)], dim=1) / 6.0
    return curve + 0.1 * torch.randn(n, 2, dtype=F64, generator=g)


def _moons(n: int, g: torch.Generator | None) -> Tensor:
    u = math.pi * torch.rand(n, dtype=F64, generator=g)
    inner = torch.rand(n, generator=g) < 0.5
    outer_pts = torch.stack([u.cos(), u.sin()], dim=1)
    inner_pts = torch.stack([1 - u.cos(), 0.5 - u.sin()], dim=1)
    x = torch.where(inner[:, None], inner_pts, outer_pts) - torch.tensor([0.5, 0.25], dtype=F64)
    return x + 0.1 * torch.randn(n, 2, dtype=F64, generator=g)


def _checkerboard(n: int, g: torch.Generator | None) -> Tensor:
    col = torch.randint(0, 4, (n,), generator=g)
    row = 2 * torch.randint(0, 2, (n,), generator=g) + col % 2  # same parity as col
    corner = torch.stack([col, row], dim=1).to(F64) - 2.0
    return corner + torch.rand(n, 2, dtype=F64, generator=g)


def sample_toy(name: ToyName, n: int, *, generator: torch.Generator | None = None) -> Tensor:
    """Draw n points (n, 2) float32 from the toy dataset ``name`` (see the module table)."""
    if name not in TOY_SOURCES:
        raise ValueError(f"unknown toy dataset {name!r}; valid options: {', '.join(TOY_SOURCES)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return TOY_SOURCES[name](n, generator).to(torch.float32)


# name -> sample(n, generator) -> (n, 2): the toy data sets
TOY_SOURCES: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "swissroll": _swissroll,
    "moons": _moons,
    "8gaussians": lambda n, g: toy_density("8gaussians").sample(n, g),
    "checkerboard": _checkerboard,
    "gmm": lambda n, g: toy_density("gmm").sample(n, g),
}
TOY_DATASETS: tuple[str, ...] = tuple(TOY_SOURCES)
