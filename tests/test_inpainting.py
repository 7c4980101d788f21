"""Inpainting with an unconditional model: replacement and RePaint [Lugmayr 2022].

Oracles: the known pixels come back bit for bit; for Gaussian data with the exact denoiser the
unknown coordinates must follow the Gaussian conditional law given the known ones (Schur
complement). With independent coordinates that law is the marginal, which the replacement
method gets right; with strong correlation replacement is biased and RePaint's resampling
must move the samples towards the conditional law.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difflab.inpainting import check_mask, inpaint, repaint_schedule
from difflab.nn.unet import build_unet
from difflab.oracles import GaussianDenoiser
from difflab.parameterization import ModelDenoiser
from difflab.schedules import DiscreteSchedule, EDMSchedule

F64 = torch.float64
SCHED = DiscreteSchedule.from_name("linear", 1000)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the schedule
def test_repaint_schedule_examples():
    assert repaint_schedule(3) == [0, 1, 2, 3]
    # jump points one step above t = 0 and every `jump` steps above that
    assert repaint_schedule(4, jump=2, resample=2) == [0, 1, 2, 3, 1, 2, 3, 4]
    assert repaint_schedule(3, jump=1, resample=3) == [0, 1, 0, 1, 0, 1, 2, 1, 2, 1, 2, 3]
    with pytest.raises(ValueError, match="resample"):
        repaint_schedule(3, resample=0)


@settings(max_examples=50, deadline=None)
@given(steps=st.integers(1, 40), jump=st.integers(1, 6), resample=st.integers(1, 5))
def test_repaint_schedule_walks_down_and_jumps_back(steps, jump, resample):
    path = repaint_schedule(steps, jump=jump, resample=resample)
    assert path[0] == 0 and path[-1] == steps and all(0 <= p <= steps for p in path)
    moves = [q - p for p, q in zip(path[:-1], path[1:])]
    assert all(m == 1 or m == -jump for m in moves)
    ups = [p for p, q in zip(path[:-1], path[1:]) if q < p]
    # each jump point (one step above t = 0, then every `jump` steps) is left resample-1 times
    points = [p for p in range(jump, steps) if (steps - 1 - p) % jump == 0]
    assert sorted(ups) == sorted(points * (resample - 1))
    downs = moves.count(1)
    assert downs == steps + (resample - 1) * jump * len(points)


# ----------------------------------------------------------------------------- exactness
def _random_unet():
    torch.manual_seed(0)
    net = build_unet("tiny", image_size=8)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return ModelDenoiser(net, SCHED)


@pytest.mark.parametrize(
    "sampler,resample,jump", [("ddpm", 1, 1), ("ddpm", 3, 2), ("ddim", 2, 1), ("heun", 1, 1),
                              ("dpm++2m", 2, 3)],
)  # fmt: skip
def test_known_pixels_are_kept_bit_for_bit(sampler, resample, jump):
    g = torch.Generator().manual_seed(1)
    x_known = torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    mask = torch.rand(3, 1, 8, 8, generator=g) < 0.5
    out = inpaint(_random_unet(), SCHED, x_known, mask, steps=6, resample=resample, jump=jump,
                  sampler=sampler, generator=g)  # fmt: skip
    assert out.shape == x_known.shape and out.dtype == x_known.dtype
    assert torch.equal(out[mask], x_known[mask])
    assert not torch.equal(out[~mask], x_known[~mask])
    assert torch.isfinite(out).all()


def test_inpainting_is_reproducible_and_reports_every_downward_step():
    den = GaussianDenoiser(torch.zeros(4), torch.eye(4), SCHED)
    x_known = torch.ones(5, 4, dtype=F64)
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0])  # broadcast over the batch
    seen = []
    kw = dict(steps=5, resample=3, jump=2, sampler="ddpm")
    a = inpaint(den, SCHED, x_known, mask, generator=torch.Generator().manual_seed(2),
                callback=lambda info: seen.append(info["i"]), **kw)  # fmt: skip
    b = inpaint(den, SCHED, x_known, mask, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b)
    downs = 5 + 2 * 2 * 2  # jump points at positions 2 and 4, two extra passes of 2 steps each
    assert seen == list(range(downs))


def test_mask_errors():
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match="0 \\(unknown\\) and 1"):
        check_mask(torch.full((2, 1, 4, 4), 0.5), x)
    with pytest.raises(ValueError, match="does not broadcast"):
        check_mask(torch.ones(3, 1, 4, 4), x)
    assert check_mask(torch.ones(4, 4), x).shape == x.shape
    with pytest.raises(ValueError, match="choose one of"):
        inpaint(lambda *a: None, SCHED, x, torch.ones(4, 4), sampler="magic")


# ----------------------------------------------------------------------------- Gaussian oracles
def _conditional(m, C, known, value):
    """Mean and covariance of x_u | x_k = value for x ~ N(m, C) [Bishop 2006, Eq. 2.81-2.82]."""
    u = ~known
    K = C[u][:, known] @ torch.linalg.inv(C[known][:, known])
    mean = m[u] + K @ (value - m[known])
    cov = C[u][:, u] - K @ C[known][:, u]
    return mean, cov


def _gaussian_kl(mean_a, cov_a, mean_b, cov_b):
    """KL(N(a) || N(b)) in closed form."""
    d = mean_a.numel()
    inv_b = torch.linalg.inv(cov_b)
    diff = mean_b - mean_a
    return 0.5 * float(
        torch.trace(inv_b @ cov_a) + diff @ inv_b @ diff - d
        + torch.logdet(cov_b) - torch.logdet(cov_a)
    )  # fmt: skip


@pytest.mark.parametrize("schedule", [SCHED, EDMSchedule()], ids=["ddpm", "edm"])
def test_independent_coordinates_are_inpainted_from_their_marginal(schedule):
    # the known coordinates carry no information: the unknown ones must follow their marginal
    m = torch.tensor([0.5, -1.0, 2.0], dtype=F64)
    C = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.3], [0.0, 0.3, 0.8]], dtype=F64)
    den = GaussianDenoiser(m, C, schedule)
    n = 4000
    x_known = torch.tensor([3.0, 0.0, 0.0], dtype=F64).expand(n, 3)
    known = torch.tensor([True, False, False])
    sampler = "ddpm" if schedule is SCHED else "euler-ancestral"
    out = inpaint(den, schedule, x_known, known, steps=100, sampler=sampler,
                  generator=torch.Generator().manual_seed(3))  # fmt: skip
    u = out[:, 1:]
    se = torch.sqrt(torch.diag(C[1:, 1:]) / n)
    torch.testing.assert_close(u.mean(0), m[1:], atol=float(5 * se.max()), rtol=0)
    torch.testing.assert_close(torch.cov(u.T), C[1:, 1:], atol=0.05, rtol=0.1)


def test_repaint_is_closer_to_the_conditional_law_than_replacement():
    # x ~ N(0, C) in 3-D with strong correlations; coordinate 0 is known
    C = torch.tensor([[1.0, 0.9, 0.7], [0.9, 1.0, 0.6], [0.7, 0.6, 1.0]], dtype=F64)
    m = torch.zeros(3, dtype=F64)
    den = GaussianDenoiser(m, C, SCHED)
    n = 3000
    value = torch.tensor([1.5], dtype=F64)
    x_known = torch.cat([value, torch.zeros(2, dtype=F64)]).expand(n, 3)
    known = torch.tensor([True, False, False])
    mean_true, cov_true = _conditional(m, C, known, value)

    def kl(resample, jump):
        out = inpaint(den, SCHED, x_known, known, steps=20, resample=resample, jump=jump,
                      generator=torch.Generator().manual_seed(4))  # fmt: skip
        u = out[:, 1:]
        return _gaussian_kl(u.mean(0), torch.cov(u.T), mean_true, cov_true)

    kl_replace, kl_repaint = kl(1, 1), kl(6, 1)
    # sampling noise alone gives KL ~ (d + d(d+1)/2) / (2n) ~ 1e-3; replacement is far off
    # (about 1.2 nats here) and RePaint, an approximation too, much closer
    assert kl_replace > 0.5
    assert kl_repaint < 0.5 * kl_replace
