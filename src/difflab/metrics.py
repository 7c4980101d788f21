"""Sample-quality metrics: 2-D metrics (MMD, sliced Wasserstein, exact NLL), FID/KID and
precision/recall.

The Frechet and kernel distances work with any feature extractor: pass features (N, F) of real
and generated images, from Inception-v3 for the published FID [Heusel 2017] / KID
[Binkowski 2018] numbers, or from any other network. Everything is computed in float64.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from difflab._util import F64

__all__ = [
    "Density",
    "exact_nll",
    "feature_statistics",
    "frechet_distance",
    "kernel_inception_distance",
    "mmd",
    "precision_recall",
    "sliced_wasserstein",
]


class Density(Protocol):
    """Anything with an exact ``log_prob(x (n, D)) -> (n,)``, e.g. ``GaussianMixture``."""

    def log_prob(self, x: Tensor) -> Tensor: ...


def _points(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must have shape (N, D) with N >= 1, got {tuple(x.shape)}")
    return x.detach().to(F64)


def _check_pair(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    x, y = _points(x, "x"), _points(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same dimension, got {x.shape[1]} and {y.shape[1]}")
    return x, y.to(x.device)


def _rbf_sum(a: Tensor, b: Tensor, bandwidths: tuple[float, ...]) -> Tensor:
    """sum_{i,j} sum_h exp(-|a_i - b_j|^2 / (2 h^2)), in row blocks of a of about 32 MB each."""
    inv_2h2 = 1.0 / (2 * torch.tensor(bandwidths, dtype=F64, device=a.device) ** 2)
    chunk = max(1, (1 << 22) // (b.shape[0] * len(bandwidths)))
    total = torch.zeros((), dtype=F64, device=a.device)
    for start in range(0, a.shape[0], chunk):
        d2 = torch.cdist(a[start : start + chunk], b).square()
        total += torch.exp(-d2[..., None] * inv_2h2).sum()
    return total


def mmd(
    x: Tensor, y: Tensor, *, bandwidths: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0)
) -> float:
    """Unbiased squared maximum mean discrepancy, MMD_u^2 of [Gretton 2012, Eq. (3)].

    k(a, b) = sum_h exp(-|a - b|^2 / (2 h^2)) (a mixture of RBF kernels, one per bandwidth h).
    x (N, D), y (M, D) with N, M >= 2. The estimate is 0 in expectation when x and y come from
    the same law, so it can be slightly negative.
    """
    x, y = _check_pair(x, y)
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"mmd needs at least 2 points in each set, got {n} and {m}")
    if not bandwidths or any(h <= 0 for h in bandwidths):
        raise ValueError(
            f"bandwidths must be a non-empty tuple of positive floats, got {bandwidths}"
        )
    nh = len(bandwidths)  # each k(a, a) = nh, removed from the within-set sums
    kxx = (_rbf_sum(x, x, bandwidths) - n * nh) / (n * (n - 1))
    kyy = (_rbf_sum(y, y, bandwidths) - m * nh) / (m * (m - 1))
    kxy = _rbf_sum(x, y, bandwidths) / (n * m)
    return float(kxx + kyy - 2 * kxy)  # Eq. (3) [Gretton 2012]


def _wasserstein_1d_pow(xs: Tensor, ys: Tensor, p: float) -> Tensor:
    """W_p^p between empirical laws, per column: xs (N, P), ys (M, P) sorted along dim 0.

    W_p^p = int_0^1 |F^{-1}(u) - G^{-1}(u)|^p du; both quantile functions are constant between
    consecutive points of {i/N} U {j/M}, so the integral is an exact finite sum.
    """
    n, m = xs.shape[0], ys.shape[0]
    if n == m:
        return (xs - ys).abs().pow(p).mean(0)
    dev = xs.device
    steps = [torch.zeros(1, dtype=F64, device=dev)]
    steps += [torch.arange(1, k + 1, dtype=F64, device=dev) / k for k in (n, m)]
    u = torch.unique(torch.cat(steps))  # sorted breakpoints 0 < ... < 1
    width = u[1:] - u[:-1]
    mid = 0.5 * (u[1:] + u[:-1])
    ix = (mid * n).floor().long().clamp_max(n - 1)
    iy = (mid * m).floor().long().clamp_max(m - 1)
    return (width[:, None] * (xs[ix] - ys[iy]).abs().pow(p)).sum(0)


def sliced_wasserstein(
    x: Tensor,
    y: Tensor,
    *,
    n_projections: int = 256,
    p: float = 2,
    generator: torch.Generator | None = None,
) -> float:
    """Sliced Wasserstein distance SW_p = (E_theta W_p^p(theta#x, theta#y))^(1/p) [Bonneel 2015].

    theta is uniform on the unit sphere (Monte Carlo over ``n_projections`` directions drawn
    with ``generator``); each 1-D W_p between the empirical laws is exact, also for N != M.
    x (N, D), y (M, D). Returns SW_p (not its p-th power).
    """
    x, y = _check_pair(x, y)
    if n_projections < 1 or p < 1:
        raise ValueError(f"need n_projections >= 1 and p >= 1, got {n_projections} and {p}")
    theta = torch.randn(x.shape[1], n_projections, dtype=F64, generator=generator)
    theta = (theta / theta.norm(dim=0, keepdim=True)).to(x.device)
    xs = (x @ theta).sort(dim=0).values
    ys = (y @ theta).sort(dim=0).values
    return float(_wasserstein_1d_pow(xs, ys, p).mean() ** (1 / p))


def exact_nll(samples: Tensor, density: Density) -> float:
    """Mean negative log-likelihood -1/N sum_i log p(x_i) in nats per sample.

    ``samples`` (N, D) are scored under a known density (e.g. ``GaussianMixture``): for generated
    samples this is the cross-entropy E_model[-log p_data], which is minimal for mode-seeking
    models; for data samples and a model density it is the usual test NLL.
    """
    samples = _points(samples, "samples")
    log_p = density.log_prob(samples)
    if log_p.shape != (samples.shape[0],):
        raise ValueError(f"density.log_prob must return shape (N,), got {tuple(log_p.shape)}")
    return float(-log_p.to(F64).mean())


def feature_statistics(features: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (F,) and unbiased covariance (F, F), float64, of features (N, F), N >= 2."""
    f = _points(features, "features")
    if f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    mu = f.mean(0)
    centred = f - mu
    return mu, centred.T @ centred / (f.shape[0] - 1)


def _sym_sqrt_psd(c: Tensor) -> Tensor:
    """Symmetric square root of a PSD matrix by eigendecomposition (negative rounding -> 0)."""
    lam, u = torch.linalg.eigh(0.5 * (c + c.T))
    return (u * lam.clamp_min(0).sqrt()) @ u.T


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Frechet distance between N(mu1, cov1) and N(mu2, cov2) [Heusel 2017, FID]:

        d^2 = |mu1 - mu2|^2 + tr(cov1 + cov2 - 2 (cov1 cov2)^(1/2)).

    tr((cov1 cov2)^(1/2)) = tr((S cov2 S)^(1/2)) with S = cov1^(1/2) (similar matrices), and
    S cov2 S is symmetric PSD, so both roots come from symmetric eigendecompositions.
    mu (F,), cov (F, F); returns d^2 (what FID reports), clamped at 0 against rounding.
    """
    mu1, mu2 = (torch.as_tensor(v, dtype=F64).detach().cpu() for v in (mu1, mu2))
    cov1, cov2 = (torch.as_tensor(c, dtype=F64).detach().cpu() for c in (cov1, cov2))
    f = mu1.shape[0]
    if mu1.shape != (f,) or mu2.shape != (f,) or cov1.shape != (f, f) or cov2.shape != (f, f):
        raise ValueError(
            "expected mu1, mu2 of shape (F,) and cov1, cov2 of shape (F, F), got "
            f"{tuple(mu1.shape)}, {tuple(cov1.shape)}, {tuple(mu2.shape)}, "
            f"{tuple(cov2.shape)}"
        )
    s = _sym_sqrt_psd(cov1)
    lam = torch.linalg.eigvalsh(s @ cov2 @ s)
    tr_sqrt = lam.clamp_min(0).sqrt().sum()
    d2 = (mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt
    return max(float(d2), 0.0)


def _poly_mmd2_unbiased(a: Tensor, b: Tensor) -> Tensor:
    """Unbiased MMD^2 with k(x, y) = (x.y / F + 1)^3 for equal-size sets a, b (m, F)."""
    m, f = a.shape
    kaa = (a @ a.T / f + 1) ** 3
    kbb = (b @ b.T / f + 1) ** 3
    kab = (a @ b.T / f + 1) ** 3
    off = (kaa.sum() - kaa.diagonal().sum() + kbb.sum() - kbb.diagonal().sum()) / (m * (m - 1))
    return off - 2 * kab.mean()


def kernel_inception_distance(
    features1: Tensor,
    features2: Tensor,
    *,
    n_subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance [Binkowski 2018]: unbiased MMD^2 with the cubic polynomial
    kernel k(x, y) = (x.y / F + 1)^3, averaged over ``n_subsets`` random subsets of
    ``subset_size`` drawn without replacement from each set. features (N1, F), (N2, F).
    Returns (mean, std) over subsets; the mean is 0 in expectation for identical laws.
    """
    f1, f2 = _check_pair(features1, features2)
    if n_subsets < 1:
        raise ValueError(f"n_subsets must be >= 1, got {n_subsets}")
    if not 2 <= subset_size <= min(f1.shape[0], f2.shape[0]):
        raise ValueError(
            f"subset_size must be in [2, min(N1, N2)] = [2, "
            f"{min(f1.shape[0], f2.shape[0])}], got {subset_size}"
        )
    values = torch.empty(n_subsets, dtype=F64)
    for i in range(n_subsets):
        i1 = torch.randperm(f1.shape[0], generator=generator)[:subset_size].to(f1.device)
        i2 = torch.randperm(f2.shape[0], generator=generator)[:subset_size].to(f2.device)
        values[i] = _poly_mmd2_unbiased(f1[i1], f2[i2]).cpu()
    return float(values.mean()), float(values.std(correction=0))


def _kth_neighbour_radii(x: Tensor, k: int, block: int) -> Tensor:
    """Distance of each row of x (N, F) to its k-th nearest other row, (N,)."""
    radii = []
    for start in range(0, x.shape[0], block):
        d = torch.cdist(x[start : start + block], x)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # the row itself is at distance 0
    return torch.cat(radii)


def _covered(points: Tensor, centres: Tensor, radii: Tensor, block: int) -> Tensor:
    """(P,) bool: is each point within radii[i] of some centres[i]?"""
    out = []
    for start in range(0, points.shape[0], block):
        d = torch.cdist(points[start : start + block], centres)
        out.append((d <= radii[None, :]).any(dim=1))
    return torch.cat(out)


def precision_recall(
    real: Tensor, fake: Tensor, *, k: int = 3, block: int = 1024
) -> tuple[float, float]:
    """Improved precision and recall [Kynkaanniemi 2019, Eqs. (1)-(2)], k = 3 as in the paper.

    The manifold of a set is the union of balls around its points, each with the radius of
    its k-th nearest neighbour in the same set. precision = the fraction of ``fake`` inside
    the manifold of ``real``; recall = the fraction of ``real`` inside the manifold of
    ``fake``. real (N, F), fake (M, F) with N, M > k; distances in float64, in row blocks.
    """
    real, fake = _check_pair(real, fake)
    if k < 1 or min(real.shape[0], fake.shape[0]) <= k:
        raise ValueError(
            f"need k >= 1 and more than k points in each set, got k = {k}, "
            f"{real.shape[0]} and {fake.shape[0]} points"
        )
    r_real = _kth_neighbour_radii(real, k, block)
    r_fake = _kth_neighbour_radii(fake, k, block)
    precision = _covered(fake, real, r_real, block).double().mean()  # Eq. (1)
    recall = _covered(real, fake, r_fake, block).double().mean()  # Eq. (2)
    return float(precision), float(recall)
