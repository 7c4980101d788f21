"""difflab against diffusers as the oracle: same network, same schedule, same sampler numbers.

Every test builds tiny random models itself (CPU, no internet). A converted network must give
diffusers' forward output to 1e-5; samplers started from the same noise must end within 1e-4.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from difflab.app.config import PRESETS, apply_overrides, get_preset  # noqa: E402
from difflab.app.kinds import kind_of  # noqa: E402
from difflab.app.runs import build  # noqa: E402
from difflab.guidance import ClassifierFreeGuidance  # noqa: E402
from difflab.interop import (  # noqa: E402
    DiffusersTimeDenoiser,
    ModelCardInfo,
    closest_preset,
    diffusers_config_from_unet,
    export_to_diffusers,
    import_to_run,
    load_diffusers,
    schedule_from_diffusers,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
    unet_config_from_diffusers,
)
from difflab.interop.diffusers import (  # noqa: E402
    DIFFUSERS_BETA_SCHEDULES,
    SCHEDULER_DEFAULTS,
    scheduler_settings,
)
from difflab.nn.unet import UNet, UNetConfig, build_unet  # noqa: E402
from difflab.parameterization import ModelDenoiser  # noqa: E402
from difflab.samplers import SAMPLERS, ThresholdedDenoiser, ddim  # noqa: E402
from difflab.samplers.ancestral import grid_posterior  # noqa: E402
from difflab.schedules import DiscreteSchedule, sampling_timesteps  # noqa: E402

pytestmark = [
    pytest.mark.parity,
    # diffusers' schedulers call np.array(tensor, copy=False) (numpy 2 deprecation)
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
]

# tiny UNet2DModel configs: attention or not, class-conditional, two resolutions, both time
# feature layouts (diffusers' default cos-first / shift 0 and DDPM's sin-first / shift 1),
# additive and scale-shift time injection, both downsample paddings
TINY = {
    "attn-16": dict(
        sample_size=16,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
    ),
    "class-8": dict(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=(8, 8, 16),
        layers_per_block=2,
        down_block_types=("DownBlock2D",) * 3,
        up_block_types=("UpBlock2D",) * 3,
        norm_num_groups=4,
        attention_head_dim=None,
        num_class_embeds=4,
        freq_shift=1,
        flip_sin_to_cos=False,
        norm_eps=1e-6,
        downsample_padding=0,
        resnet_time_scale_shift="scale_shift",
        attn_norm_num_groups=4,
    ),
    "ddpm-8": dict(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=None,
        add_attention=False,
        freq_shift=1,
        flip_sin_to_cos=False,
        norm_eps=1e-6,
        downsample_padding=0,
    ),
}

# google/ddpm-cifar10-32's unet/config.json (the released DDPM CIFAR-10 model)
DDPM_CIFAR10_32 = {
    "_class_name": "UNet2DModel",
    "act_fn": "silu",
    "attention_head_dim": None,
    "block_out_channels": [128, 256, 256, 256],
    "center_input_sample": False,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "in_channels": 3,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 32,
    "time_embedding_type": "positional",
    "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
}


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Add noise to every parameter, so no zero-initialised layer hides a mapping error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return model.eval()


def _diffusers_unet(name: str, seed: int = 0) -> diffusers.UNet2DModel:
    torch.manual_seed(seed)
    return _perturb(diffusers.UNet2DModel(**TINY[name]), seed)


def _converted(m: diffusers.UNet2DModel, null_label: str = "last") -> UNet:
    cfg = unet_config_from_diffusers(dict(m.config), null_label=null_label)
    sd = state_dict_from_diffusers(
        m.state_dict(), cfg, flip_sin_to_cos=m.config.flip_sin_to_cos, null_label=null_label
    )
    net = UNet(**dataclasses.asdict(cfg)).eval()
    net.load_state_dict(sd)
    return net


# ------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize("name", list(TINY))
def test_converted_unet_equals_diffusers_forward(name: str) -> None:
    # bugs caught: q/k/v order, head split, t vs t - 1, sin/cos order, freq shift, padding side,
    # norm eps, skip order, class table offset
    m = _diffusers_unet(name)
    net = _converted(m)
    c, s = m.config.in_channels, m.config.sample_size
    x = torch.randn(3, c, s, s, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 2, 3]) if m.config.num_class_embeds else None
    for k in (torch.tensor([0.0, 10.0, 999.0]), torch.tensor([500.0, 37.5, 998.0])):
        with torch.no_grad():
            theirs = m(x, k, class_labels=labels).sample
            ours = net(x, k + 1, labels)  # difflab t = diffusers k + 1
        assert (ours - theirs).abs().max() < 1e-5


def test_unsupported_options_are_one_line_errors() -> None:
    base = dict(TINY["attn-16"])
    for key, value in [
        ("time_embedding_type", "fourier"),
        ("down_block_types", ("DownBlock2D", "CrossAttnDownBlock2D")),
        ("act_fn", "gelu"),
        ("class_embed_type", "timestep"),
        ("block_out_channels", (8, 12)),
    ]:
        with pytest.raises(ValueError, match=key) as err:
            unet_config_from_diffusers({**base, key: value})
        assert "\n" not in str(err.value)
    # per-level head counts that differ cannot be one num_heads
    cfg = {
        **base,
        "attention_head_dim": 8,
        "down_block_types": ("AttnDownBlock2D", "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D"),
    }
    with pytest.raises(ValueError, match="attention_head_dim"):
        unet_config_from_diffusers(cfg)


def test_ddpm_cifar10_preset_is_google_ddpm_cifar10_32() -> None:
    cfg = unet_config_from_diffusers(DDPM_CIFAR10_32)
    assert closest_preset(cfg) == ("ddpm-cifar10", {})
    # and the weights fit tensor for tensor, in shape
    with torch.device("meta"):
        theirs = diffusers.UNet2DModel(**DDPM_CIFAR10_32).state_dict()
        ours = build_unet("ddpm-cifar10", dropout=0.0).state_dict()
    ours = {k: torch.empty(v.shape) for k, v in ours.items()}
    mapped = state_dict_to_diffusers(ours, cfg)
    assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in theirs.items()}
    assert diffusers_config_from_unet(cfg)["downsample_padding"] == 0


def _difflab_unet(seed: int = 0, **overrides: object) -> UNet:
    torch.manual_seed(seed)
    cfg = UNetConfig(
        image_size=8,
        in_channels=3,
        base_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_heads=2,
        dropout=0.0,
        norm_groups=4,
        use_scale_shift_norm=False,
    )
    return _perturb(UNet(**dataclasses.asdict(dataclasses.replace(cfg, **overrides))), seed)


def _export(net: UNet, out, schedule: DiscreteSchedule, **kw: object):
    return export_to_diffusers(
        out,
        unet_config=net.config,
        state_dict=net.state_dict(),
        schedule=schedule,
        card=ModelCardInfo(description="a test model", metrics={"FID": 1.5}, command="difflab"),
        **kw,
    )


@pytest.mark.parametrize("num_classes", [0, 3])
def test_export_round_trips_through_from_pretrained(tmp_path, num_classes: int) -> None:
    net = _difflab_unet(num_classes=num_classes)
    schedule = DiscreteSchedule.from_name("cosine", 1000)
    out = _export(net, tmp_path / "export", schedule)
    # diffusers reads back exactly the tensors written
    m = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    written = state_dict_to_diffusers(net.state_dict(), net.config)
    assert set(m.state_dict()) == set(written)
    assert all(torch.equal(m.state_dict()[k], v) for k, v in written.items())
    # the same function of (x, t) on both sides
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    k = torch.tensor([0.0, 713.0])
    labels = torch.tensor([1, num_classes]) if num_classes else None  # incl. the null label
    with torch.no_grad():
        assert (m(x, k, class_labels=labels).sample - net(x, k + 1, labels)).abs().max() < 1e-5
    # and difflab reads the folder back to the same network and schedule
    loaded = load_diffusers(out)
    assert loaded.num_classes == num_classes and loaded.parameterization == "eps"
    assert torch.allclose(loaded.schedule.alpha_bar, schedule.alpha_bar, rtol=0, atol=1e-15)
    for key, v in net.state_dict().items():
        assert torch.allclose(loaded.unet.state_dict()[key], v, rtol=0, atol=1e-6), key
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: mit") and "| FID | 1.5 |" in card
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["beta_schedule"] == "squaredcos_cap_v2"


def test_export_refuses_an_existing_folder_and_overwrites_on_request(tmp_path) -> None:
    net = _difflab_unet()
    schedule = DiscreteSchedule.from_name("linear", 1000)
    out = _export(net, tmp_path / "e", schedule)
    with pytest.raises(ValueError, match="not empty"):
        _export(net, out, schedule)
    _export(net, out, schedule, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e"]  # no temporary folders left


def test_load_lone_unet_folder_and_class_guidance(tmp_path) -> None:
    m = _diffusers_unet("class-8")
    m.save_pretrained(tmp_path / "unet")
    sched = diffusers.DDPMScheduler(prediction_type="v_prediction")
    sched.save_pretrained(tmp_path / "unet")
    loaded = load_diffusers(tmp_path / "unet", null_label="last")
    assert loaded.parameterization == "v" and loaded.num_classes == 3
    assert loaded.data_shape == (1, 8, 8)
    # classifier-free guidance at scale 1 is the conditional model, at 0 the null-label one
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 400.0, dtype=torch.float64)
    y = torch.tensor([0, 2])
    cond = loaded.denoiser(x, t, y).x0
    uncond = loaded.denoiser(x, t, torch.full((2,), 3)).x0
    for scale, want in ((1.0, cond), (0.0, uncond)):
        got = ClassifierFreeGuidance(loaded.denoiser, scale=scale, null_label=3)(x, t, y).x0
        assert torch.allclose(got, want, atol=1e-6)
    # the diffusers network at k = 399 with v prediction, converted by hand
    with torch.no_grad():
        v = m(x, torch.tensor([399.0, 399.0]), class_labels=y).sample
    ab = torch.tensor(float(sched.alphas_cumprod[399]))
    assert torch.allclose(cond, ab.sqrt() * x - (1 - ab).sqrt() * v, atol=1e-5)


def test_load_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a diffusers folder"):
        load_diffusers(tmp_path)
    m = _diffusers_unet("attn-16")
    m.save_pretrained(tmp_path / "u")
    with pytest.raises(ValueError, match="scheduler config"):
        load_diffusers(tmp_path / "u")
    diffusers.DDPMScheduler(beta_schedule="laplace").save_pretrained(tmp_path / "u")
    with pytest.raises(ValueError, match="beta_schedule='laplace'"):
        load_diffusers(tmp_path / "u")


def test_import_to_run(tmp_path) -> None:
    net = _difflab_unet(num_classes=3)
    out = _export(net, tmp_path / "e", DiscreteSchedule.from_name("linear", 1000))
    run = import_to_run(out)
    assert run.unet_config == net.config and run.num_classes == 3
    assert run.schedule_config["name"] == "linear"
    sections = run.run_config_sections()
    assert sections["diffusion"] == {"schedule": "linear", "T": 1000, "zero_terminal_snr": False,
                                     "beta_start": 0.0001, "beta_end": 0.02}  # fmt: skip
    rebuilt = UNet(**dataclasses.asdict(run.unet_config))
    rebuilt.load_state_dict(run.state_dict)


# ---------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("name", list(DIFFUSERS_BETA_SCHEDULES))
@pytest.mark.parametrize("zero_snr", [False, True])
def test_schedules_equal_diffusers(name: str, zero_snr: bool) -> None:
    sched = diffusers.DDPMScheduler(
        num_train_timesteps=1000, beta_schedule=name, rescale_betas_zero_snr=zero_snr
    )
    ours = schedule_from_diffusers(dict(sched.config))
    # diffusers computes in float32: betas to a few ulp of 1 (they are 1 - alpha, and the
    # zero-SNR rescale forms alpha from float32 square roots near 1), alpha_bar to the rounding
    # of a 1000-factor float32 product (~1000 * 6e-8 relative at worst)
    assert torch.allclose(ours.betas.float(), sched.betas, rtol=1e-5, atol=5e-7)
    assert torch.allclose(ours.alpha_bar[1:].float(), sched.alphas_cumprod, rtol=1e-4, atol=1e-9)
    if zero_snr:
        assert float(ours.alpha_bar[-1]) == 0.0


@pytest.mark.parametrize("name", sorted(SCHEDULER_DEFAULTS))
def test_scheduler_keys_left_out_take_that_schedulers_diffusers_defaults(name: str) -> None:
    """A saved scheduler config may leave keys out (older diffusers versions wrote fewer keys,
    and hand-written configs are common); diffusers then uses the defaults of that class,
    which differ: Heun and KDPM2 default to betas 0.00085-0.012, only DDPM and DDIM clip.

    Oracle: diffusers' own ``from_config`` on the same partial config. Bug caught: one set of
    fallbacks for every class (the DDPM betas 0.0001-0.02 for a Heun config: alpha_bar_T
    4.0e-5 where diffusers has 0.0066).
    """
    cls = getattr(diffusers, name)
    signature = inspect.signature(cls.__init__).parameters
    for key, ours in SCHEDULER_DEFAULTS[name].items():
        if key in signature:
            assert ours == signature[key].default, (name, key)
    for partial in ({}, {"beta_schedule": "scaled_linear"}, {"num_train_timesteps": 500}):
        config = {"_class_name": name, **partial}
        theirs = cls.from_config(config)
        ours = schedule_from_diffusers(config)
        settings = scheduler_settings(config)
        if not hasattr(theirs, "alphas_cumprod"):  # flow matching: no betas, the shift is all
            assert ours.shift == theirs.config.shift, (name, partial)
            assert settings["clip_sample"] is False
            continue
        assert torch.allclose(ours.alpha_bar[1:].float(), theirs.alphas_cumprod, rtol=1e-4)
        assert settings["prediction_type"] == theirs.config.prediction_type
        assert settings["clip_sample"] == theirs.config.get("clip_sample", False)


def test_a_folder_with_a_partial_scheduler_config_samples_as_diffusers_reads_it(tmp_path) -> None:
    """load_diffusers on a pipeline whose scheduler_config.json holds only its class name."""
    m = _diffusers_unet("attn-16")
    m.save_pretrained(tmp_path / "p" / "unet")
    (tmp_path / "p" / "scheduler").mkdir()
    config = {"_class_name": "HeunDiscreteScheduler"}
    (tmp_path / "p" / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    (tmp_path / "p" / "model_index.json").write_text(json.dumps({"_class_name": "DDPMPipeline"}))
    loaded = load_diffusers(tmp_path / "p")
    theirs = diffusers.HeunDiscreteScheduler.from_config(config)
    assert torch.allclose(loaded.schedule.alpha_bar[1:].float(), theirs.alphas_cumprod, rtol=1e-4)
    assert loaded.parameterization == "eps" and loaded.clip_sample is False


@pytest.mark.parametrize("scheduler", ["EDMEulerScheduler", "ScoreSdeVeScheduler"])
def test_a_scheduler_of_another_kind_of_model_is_refused_by_name(tmp_path, scheduler) -> None:
    """An EDM or VE-SDE scheduler would otherwise be read as a linear-beta eps-prediction
    DDPM and sampled silently wrong: refuse it, naming the class and the file (the
    flow-matching Euler scheduler is read as a flow model: test_flow_runs.py)."""
    m = _diffusers_unet("attn-16")
    m.save_pretrained(tmp_path / "u")
    getattr(diffusers, scheduler)().save_pretrained(tmp_path / "u")
    with pytest.raises(ValueError, match=f"scheduler_config.json: scheduler '{scheduler}'") as e:
        load_diffusers(tmp_path / "u")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=scheduler):
        schedule_from_diffusers({"_class_name": scheduler})


# ----------------------------------------------------------------------------------- samplers


@pytest.fixture(scope="module")
def model_pair():
    """A tiny diffusers network, its difflab conversion, the common schedule and x_T.

    The network is read as a v-prediction model: a random network then gives bounded x0 =
    alpha x - sigma v, so samples stay O(1) and 1e-4 is a meaningful tolerance (a random
    eps-prediction network would blow x0 up by 1 / alpha_T).
    """
    m = _diffusers_unet("attn-16", seed=5)
    net = _converted(m)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    schedule = schedule_from_diffusers(dict(sched.config))
    noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    return m, net, schedule, noise


def _same_schedule(scheduler) -> DiscreteSchedule:
    """difflab's schedule with diffusers' float32 alpha_bar values exactly.

    diffusers keeps alpha_bar in float32, so its sigma near t = 0 (sqrt(1 - alpha_bar) with
    alpha_bar ~ 0.9999) is off by ~1e-4 relative from the float64 schedule; sampler
    comparisons use diffusers' own numbers so that only the solvers are compared.
    """
    ab = torch.cat([torch.ones(1), scheduler.alphas_cumprod]).to(torch.float64)
    return DiscreteSchedule(1 - ab[1:] / ab[:-1])


def _run_diffusers(m, scheduler, noise: torch.Tensor, **step_kw: object) -> torch.Tensor:
    x = noise * scheduler.init_noise_sigma
    with torch.no_grad():
        for k in scheduler.timesteps:
            out = m(scheduler.scale_model_input(x, k), k).sample
            x = scheduler.step(out, k, x, **step_kw).prev_sample
    return x


@pytest.mark.parametrize(
    "spacing,steps,clip", [("trailing", 10, False), ("leading", 10, False), ("trailing", 20, True)]
)
def test_ddim_equals_diffusers(model_pair, spacing: str, steps: int, clip: bool) -> None:
    # bugs caught: t vs k off by one, alpha_bar_prev at the last step (set_alpha_to_one),
    # clipped eps not recomputed (use_clipped_model_output)
    m, net, schedule, noise = model_pair
    sch = diffusers.DDIMScheduler(
        num_train_timesteps=1000,
        timestep_spacing=spacing,
        set_alpha_to_one=True,
        clip_sample=clip,
        steps_offset=0,
        prediction_type="v_prediction",
    )
    sch.set_timesteps(steps)
    theirs = _run_diffusers(m, sch, noise, eta=0.0, use_clipped_model_output=True)
    schedule = _same_schedule(sch)
    den = ModelDenoiser(net, schedule, parameterization="v")
    if clip:
        den = ThresholdedDenoiser(den, schedule, mode="clip")
    ts = sampling_timesteps(schedule, steps, spacing=spacing)  # type: ignore[arg-type]
    assert torch.equal(ts[:-1] - 1, sch.timesteps.to(torch.float64))
    ours = ddim(den, noise, ts, schedule=schedule)
    assert (ours - theirs).abs().max() < 1e-4


def test_ddim_trailing_30_steps_diffusers_steps_to_a_time_off_the_grid() -> None:
    # diffusers' DDIM takes the previous time as k - T // N, which is off the trailing grid when
    # N does not divide T; difflab steps to the next grid time (Song 2021, Eq. 12 on the chosen
    # sub-sequence), so there the two differ on purpose.
    sch = diffusers.DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=True)
    sch.set_timesteps(30)
    ks = sch.timesteps.tolist()
    stride = 1000 // 30
    assert any(a - stride != b for a, b in zip(ks, ks[1:]))


def test_dpmpp_2m_karras_equals_diffusers(model_pair) -> None:
    # diffusers rounds the network's timestep on Karras grids; DiffusersTimeDenoiser feeds the
    # same time so that only the solver is compared
    m, net, schedule, noise = model_pair
    sch = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=2,
        use_karras_sigmas=True,
        lower_order_final=True,
        algorithm_type="dpmsolver++",
        final_sigmas_type="zero",
        prediction_type="v_prediction",
    )
    sch.set_timesteps(10)
    theirs = _run_diffusers(m, sch, noise)
    schedule = _same_schedule(sch)
    den = DiffusersTimeDenoiser(net, schedule, parameterization="v", time_input="log_sigma_rounded")
    ts = sampling_timesteps(schedule, 10, spacing="karras")
    ours = SAMPLERS["dpm++2m"](den, noise, ts, schedule=schedule)
    assert (ours - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_euler_heun_karras_equal_diffusers(model_pair, sampler: str) -> None:
    m, net, schedule, noise = model_pair
    cls = (
        diffusers.EulerDiscreteScheduler if sampler == "euler" else diffusers.HeunDiscreteScheduler
    )
    # diffusers' Heun defaults to other betas (scaled_linear 0.00085..0.012): set them
    sch = cls(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        use_karras_sigmas=True,
        prediction_type="v_prediction",
    )
    sch.set_timesteps(8)
    theirs = _run_diffusers(m, sch, noise)
    schedule = _same_schedule(sch)
    den = DiffusersTimeDenoiser(net, schedule, parameterization="v", time_input="log_sigma")
    ts = sampling_timesteps(schedule, 8, spacing="karras")
    x_start = noise * sch.init_noise_sigma * float(schedule.alpha(ts[0]))  # x = alpha * y
    fn = SAMPLERS[sampler]
    ours = fn(den, x_start, ts, schedule=schedule)
    assert (ours - theirs).abs().max() < 1e-4


def test_ddpm_posterior_mean_and_variance_equal_diffusers() -> None:
    schedule = DiscreteSchedule.from_name("linear", 1000)
    sch = diffusers.DDPMScheduler(num_train_timesteps=1000, clip_sample=False)
    sch.set_timesteps(10)  # respaced: diffusers' previous_timestep is the next grid time
    ts = torch.cat([sch.timesteps.to(torch.float64) + 1, torch.zeros(1, dtype=torch.float64)])
    table = grid_posterior(schedule, ts)
    g = torch.Generator().manual_seed(0)
    x, x0 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    for i, k in enumerate(sch.timesteps.tolist()):
        ab = sch.alphas_cumprod[k]
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()  # an eps prediction consistent with x0
        mean = sch.step(eps, k, x).prev_sample if k == sch.timesteps[-1] else None
        var = float(sch._get_variance(k)) if i < len(ts) - 2 else 0.0
        ours_mean = table["coef_xt"][i] * x + table["coef_x0"][i] * x0
        gen = torch.Generator().manual_seed(i)
        out = sch.step(eps, k, x, generator=gen).prev_sample
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(i))
        theirs_mean = out - var**0.5 * z if mean is None else mean
        assert torch.allclose(ours_mean.float(), theirs_mean, atol=1e-5), k
        # rel 1e-3: at k = 100 -> 0 diffusers forms 1 - alpha_bar_0 = 1e-4 from a float32
        # alpha_bar_0 = 0.9999 (absolute error ~6e-8, so ~6e-4 relative)
        assert var == pytest.approx(float(table["beta_tilde"][i]), rel=1e-3, abs=1e-12)


# ---------------------------------------------------------------------------------- pipelines


def _card_call(card: str) -> dict[str, object]:
    """The keyword arguments of the ``pipe(...)`` call in a model card's usage snippet."""
    (line,) = [ln for ln in card.splitlines() if ln.startswith("images = pipe(")]
    call = ast.parse(line).body[0].value.value  # images = pipe(...).images
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}


def test_the_model_cards_ddim_pipeline_call_reproduces_difflab_ddim(tmp_path) -> None:
    """Oracle: difflab's ddim (eta 0, trailing grid, x0 clipped and eps recomputed) on the same
    noise. The card's own call, run in diffusers with fewer images and steps, must give the
    same images; diffusers' default (the network's eps beside the clipped x0) does not.
    Bug caught: a card without ``use_clipped_model_output=True`` (max difference ~1 here)."""
    net = _difflab_unet(seed=2)
    schedule = DiscreteSchedule.from_name("linear", 1000)
    out = _export(net, tmp_path / "e", schedule)
    card = (out / "README.md").read_text()
    call = _card_call(card)
    assert "use_clipped_model_output" in card.split("```")[2]  # the text says why
    pipe = diffusers.DDIMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)

    def run(**kw):
        kw.update(batch_size=2, num_inference_steps=10, output_type="np",
                  generator=torch.Generator().manual_seed(0))  # fmt: skip
        return pipe(**kw).images  # (B, H, W, C) in [0, 1]

    images = run(**call)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    den = ThresholdedDenoiser(ModelDenoiser(net, schedule), schedule, mode="clip")
    ours = ddim(den, noise, sampling_timesteps(schedule, 10, spacing="trailing"), schedule=schedule)
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert abs(ours - images).max() < 1e-4
    default = run(**{k: v for k, v in call.items() if k != "use_clipped_model_output"})
    assert abs(ours - default).max() > 0.1
    assert diffusers.DDPMPipeline.from_pretrained(out).unet.config.sample_size == 8


# ------------------------------------------------------------------------------ every preset

_EXPORTABLE = [n for n, c in PRESETS.items() if not kind_of(c).why_no_diffusers_form(c)]


def test_the_presets_that_cannot_be_exported_are_the_conditioned_latent_and_dit_ones() -> None:
    unets = {n: c for n, c in PRESETS.items() if c.model.net in ("unet", "mlp", "autoencoder")}
    cannot = {kind_of(c).name for n, c in unets.items() if n not in _EXPORTABLE}
    assert "diffusion-image" not in cannot
    assert {"mnist", "cifar10", "folder", "mnist-14"} <= set(_EXPORTABLE)
    # diffusers samples a DiT only on its own VAE's latents
    assert not {"mnist-dit", "mnist-uvit", "mnist-latent-dit"} & set(_EXPORTABLE)


@pytest.mark.parametrize("preset", _EXPORTABLE)
def test_every_image_preset_exports_to_a_folder_diffusers_samples(tmp_path, preset) -> None:
    """Each preset's network (its U-Net preset with fewer channels, ``model.unet``) exported the
    way ``difflab export`` does it, then loaded and sampled by diffusers with the model card's
    own call: the images are difflab's ddim from the same noise (1e-4). The ``mnist`` presets'
    2x2 fold (``patch_size=2``) has no UNet2DModel option: the folder holds the U-Net on the
    folded images and a pipeline that unfolds them (``trust_remote_code=True``); the fold
    permutes pixels, so the noise is the folded image of difflab's noise. Bugs caught: a
    folded config with the wrong channels or size (the weights then do not load), attention
    placed by the unfolded size, the pipeline not unfolding."""
    cfg = apply_overrides(
        get_preset(preset),
        ['model.unet={"base_channels": 16, "norm_groups": 4}', "model.dropout=0"],
    )
    built = build(cfg, device=torch.device("cpu"), load_data=False)
    net = _perturb(built.model, seed=1, scale=0.05).eval()
    out = export_to_diffusers(
        tmp_path / "e", unet_config=net.config, state_dict=net.state_dict(),
        schedule=built.schedule, parameterization=cfg.model.parameterization,
        clip_sample=True, card=ModelCardInfo(),
    )  # fmt: skip
    card = (out / "README.md").read_text()
    p = net.config.patch_size
    if p > 1:  # as the card says
        assert "trust_remote_code=True" in card and (out / "pipeline.py").is_file()
        pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    else:
        pipe = diffusers.DDIMPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    kw = {**_card_call(card), "batch_size": 2, "num_inference_steps": 4, "output_type": "np"}
    images = pipe(**kw, generator=torch.Generator().manual_seed(0)).images
    c, h, _ = built.data_shape
    folded = (2, c * p * p, h // p, h // p)
    noise = torch.nn.functional.pixel_shuffle(
        torch.randn(folded, generator=torch.Generator().manual_seed(0)), p
    )
    den = ThresholdedDenoiser(built.denoiser, built.schedule, mode="clip")
    ts = sampling_timesteps(built.schedule, 4, spacing="trailing")
    with torch.no_grad():
        ours = ddim(den, noise, ts, schedule=built.schedule, cond=_labels(cfg))
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert images.shape == ours.shape == (2, h, h, c)
    # 5e-4: float32 round-off of two convolution implementations over 4 steps, amplified
    # where x0 is clipped (one grey level is 4e-3)
    assert abs(ours - images).max() < 5e-4
    # and difflab reads the folder back to the same network
    loaded = load_diffusers(out).unet.config
    assert loaded == dataclasses.replace(net.config, out_channels=None)


def _labels(cfg):
    """A class-conditional preset sampled by an unconditional pipeline gets the null label."""
    n = cfg.model.num_classes
    return torch.full((2,), n) if n else None
