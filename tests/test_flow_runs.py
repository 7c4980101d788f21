"""Flow-matching runs end to end: the process entry's checks, `difflab nll` on a flow run, and
the diffusers round trip (export with FlowMatchEulerDiscreteScheduler, diffusers' own loop,
`difflab sample DIR`, `difflab import`).

The library's flow-matching math is tested against its oracles in test_flow.py; these tests
check that the commands use it: a flow run's likelihood is the library's PF-ODE likelihood of
its model, and an exported flow run is sampled by diffusers' scheduler exactly as difflab's
flow-euler samples it (diffusers calls the network with 1000 sigma, difflab with 1000 t).
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from difflab import checkpoint as ckpt
from difflab.app.cli import main
from difflab.app.config import PRESETS, apply_overrides, get_preset
from difflab.app.runs import build, check_config, load_run
from difflab.nn.unet import UNet, UNetConfig
from difflab.parameterization import ModelDenoiser
from difflab.process_table import diffusion_settings, process_for
from difflab.samplers import sample
from difflab.schedules import FlowMatchSchedule
from helpers import write_bar_images

FLOW_PRESETS = ("swissroll-fm", "mnist-fm", "mnist-cond-fm", "mnist-latent-fm")
FAST = ["--steps", "6", "--no-progress", "--device", "cpu",
        "--set", "train.batch_size=16", "--set", "train.log_every=2",
        "--set", "train.ckpt_every=3", "--set", "sample.n=16", "--set", "sample.steps=4",
        "--set", "model.hidden=16", "--set", "model.depth=2"]  # fmt: skip


def _one_line_error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("difflab: error:") and "\n" not in err, err
    return err


# ---- the process entry ---------------------------------------------------------------------


def test_flow_presets_share_mnists_network_and_recipe():
    """A benchmark compares processes at equal cost: only the process differs from mnist-eps
    (the eps recipe); mnist, the recipe race's winner, is mnist-eps by flow matching with
    mnist-eps's default sampler, and mnist-fm differs from it only in its sampler."""
    eps = PRESETS["mnist-eps"]
    assert eps.diffusion.schedule == "linear" and eps.model.parameterization == "eps"
    for name in ("mnist", "mnist-fm", "mnist-cond-fm"):
        cfg = get_preset(name)
        assert cfg.model.net == eps.model.net and cfg.model.preset == "mnist-cpu"
        assert cfg.train == eps.train and cfg.data == eps.data, name
        assert cfg.diffusion.schedule == "flow" and cfg.model.parameterization == "flow"
        assert cfg.diffusion.t_sampling == "logit-normal"
    mnist, fm = PRESETS["mnist"], PRESETS["mnist-fm"]
    assert mnist.sample == eps.sample  # the race scored every recipe with this sampler
    assert dataclasses.replace(fm, preset="mnist", sample=mnist.sample) == mnist
    assert (fm.sample.sampler, fm.sample.steps) == ("flow-euler", 20)
    assert get_preset("mnist-cond-fm").model.num_classes == 10
    latent = get_preset("mnist-latent-fm")
    assert latent.model.kind == "latent" and latent.train == PRESETS["mnist-latent"].train
    for name in FLOW_PRESETS:  # no setting the flow process refuses
        cfg = get_preset(name)
        process = process_for(cfg.diffusion.schedule)
        process.check(dataclasses.asdict(cfg.diffusion))
        process.check_model(cfg.model.parameterization, cfg.model.learned_variance)
    check_config(get_preset("mnist-fm"))


def test_a_flow_run_calls_its_network_with_1000_t():
    """The network's time input is that of DDPM's steps (1000 t), as diffusers' flow models."""
    cfg = apply_overrides(get_preset("swissroll-fm"), ["model.hidden=8", "model.depth=1"])
    built = build(cfg, device=torch.device("cpu"))
    assert isinstance(built.schedule, FlowMatchSchedule) and built.denoiser.time_scale == 1000.0
    seen = {}
    built.denoiser.model.register_forward_pre_hook(lambda m, args: seen.update(t=args[1]))
    with torch.no_grad():
        built.denoiser(torch.zeros(3, 2), torch.full((3,), 0.25, dtype=torch.float64))
    assert torch.allclose(seen["t"], torch.full((3,), 250.0))
    shifted = build(apply_overrides(cfg, ["diffusion.shift=3"]), device=torch.device("cpu"))
    assert shifted.schedule.shift == 3.0


@pytest.mark.parametrize(
    "preset,sets,message",
    [
        ("swissroll-fm", ["model.learned_variance=true"], "learned_variance needs a discrete"),
        ("swissroll-fm", ["diffusion.t_sampling=importance"], "importance"),
        ("swissroll-fm", ["diffusion.beta_start=0.001"], "beta_start/beta_end apply"),
        ("swissroll-fm", ["diffusion.zero_terminal_snr=true"], "zero_terminal_snr applies"),
        ("swissroll-fm", ["model.parameterization=eps"], "parameterization=eps does not suit"),
        ("swissroll-fm", ["diffusion.mode_scale=3"], "mode_scale must be in"),
        ("swissroll-fm", ["diffusion.shift=0"], "diffusion.shift must be > 0"),
        ("swissroll", ["diffusion.shift=3"], "diffusion.shift applies to diffusion.schedule=flow"),
        ("swissroll", ["diffusion.t_sampling=logit-normal"], "applies to diffusion.schedule=flow"),
        ("swissroll", ["diffusion.schedule=edm", "diffusion.logit_std=2"], "logit_std applies"),
    ],
)
def test_what_a_process_cannot_use_is_refused_before_any_work(
    preset, sets, message, tmp_path, capsys
):
    args = ["train", "--preset", preset, "--out", str(tmp_path / "r"), *FAST]
    for s in sets:
        args += ["--set", s]
    assert message in _one_line_error(capsys, main(args))
    assert not (tmp_path / "r").exists()


def test_the_flow_time_law_settings_reach_the_loss(monkeypatch):
    """diffusion.logit_mean/std and mode_scale are the loss's flow_* options (SD3's defaults
    when unset); a wrong mapping (e.g. std into the mean) would train on other times."""
    p = process_for("flow")
    cfg = get_preset("swissroll-fm")
    assert p.loss_options(dataclasses.asdict(cfg.diffusion)) == {
        "flow_logit_mean": 0.0, "flow_logit_std": 1.0, "flow_mode_scale": 1.29}  # fmt: skip
    sets = ["diffusion.logit_mean=-0.5", "diffusion.logit_std=2", "diffusion.mode_scale=0.5"]
    d = dataclasses.asdict(apply_overrides(cfg, sets).diffusion)
    assert p.loss_options(d) == {"flow_logit_mean": -0.5, "flow_logit_std": 2.0,
                                 "flow_mode_scale": 0.5}  # fmt: skip
    # and the run's loss passes them on
    import difflab.app.kinds as kinds

    seen = {}

    def spy(denoiser, x0, **options):
        seen.update(options)
        raise RuntimeError("stop")

    monkeypatch.setattr(kinds, "process_for", lambda s: dataclasses.replace(p, loss=spy))
    cfg = apply_overrides(cfg, ["diffusion.logit_mean=-0.5", "model.hidden=8", "model.depth=1"])
    built = build(cfg, device=torch.device("cpu"))
    loss_fn = built.kind.loss_fn(built, {})
    with pytest.raises(RuntimeError, match="stop"):
        loss_fn((torch.zeros(4, 2), None), torch.Generator())
    assert seen["flow_logit_mean"] == -0.5 and seen["t_sampling"] == "uniform"


# ---- likelihood ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("flow") / "run"
    assert main(["train", "--preset", "swissroll-fm", "--out", str(run), *FAST]) == 0
    return run


def test_nll_of_a_flow_run_is_the_librarys_pf_ode_likelihood(flow_run, capsys):
    """`difflab nll` on a flow run (no VLB: the bound needs discrete steps) is the PF-ODE NLL
    of the run's EMA model on the same held-out points (the likelihood itself is checked
    against the exact Gaussian density in test_flow.py)."""
    from difflab.app.evaluate import _held_out
    from difflab.ode_likelihood import pf_ode_nll

    args = ["nll", str(flow_run), "--n", "24", "--ode-steps", "6", "--seed", "2",
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "vlb" not in res and res["unit"] == "nats"
    built = load_run(flow_run)
    x = _held_out(built, 24, seed=2)
    g = torch.Generator().manual_seed(2)
    nll = pf_ode_nll(built.denoiser, x.float(), built.schedule, steps=6, generator=g)
    assert res["ode"]["mean"] == pytest.approx(float(nll.double().mean()), rel=1e-6)


# ---- diffusers -----------------------------------------------------------------------------


def _unet(seed: int) -> UNet:
    torch.manual_seed(seed)
    cfg = UNetConfig(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2),
                     num_res_blocks=1, attention_resolutions=(4,), num_heads=2, dropout=0.0,
                     norm_groups=4)  # fmt: skip
    net = UNet(**dataclasses.asdict(cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # no zero-initialised layer may hide a mapping error
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.mark.parity
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_diffusers_own_loop_on_an_exported_flow_model_is_flow_euler(tmp_path, shift):
    """An exported velocity U-Net, loaded by diffusers, stepped by FlowMatchEulerDiscrete-
    Scheduler (set_timesteps with the unshifted sigmas linspace(1, 1/N, N), which it shifts
    once; scheduler.step) from the same noise, equals difflab's flow-euler to float round-off.
    Bugs caught: the weights exported with a discrete model's time offset (t = k + 1; ~1e-3
    here), the shift lost or applied twice, a wrong num_train_timesteps."""
    diffusers = pytest.importorskip("diffusers")
    from difflab.interop import export_to_diffusers

    net, sched = _unet(seed=int(shift)), FlowMatchSchedule(shift=shift)
    out = export_to_diffusers(tmp_path / "e", unet_config=net.config,
                              state_dict=net.state_dict(), schedule=sched,
                              parameterization="flow", clip_sample=False)  # fmt: skip
    unet = diffusers.UNet2DModel.from_pretrained(out / "unet").eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(out / "scheduler")
    steps = 5
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1.0 / steps, steps))
    x1 = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    x = x1.clone()
    with torch.no_grad():
        for k in scheduler.timesteps:
            x = scheduler.step(unet(x, k).sample, k, x).prev_sample
        den = ModelDenoiser(net, sched, parameterization="flow", time_scale=1000.0)
        ours = sample(den, sched, x1.shape, sampler="flow-euler", steps=steps, x_init=x1)
    assert (ours - x).abs().max() < 1e-4
    # the shipped pipeline runs the same loop (the model card's call, clipping included)
    card = (out / "README.md").read_text()
    assert "FlowMatchEulerDiscreteScheduler" in card and "clip_sample=True" in card
    pipe = diffusers.DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    for clip in (False, True):
        g = torch.Generator().manual_seed(0)
        images = pipe(batch_size=2, num_inference_steps=steps, clip_sample=clip,
                      output_type="np", generator=g).images  # fmt: skip
        with torch.no_grad():
            x = sample(den, sched, x1.shape, sampler="flow-euler", steps=steps, x_init=x1,
                       threshold="clip" if clip else None)  # fmt: skip
        expected = (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        assert np.abs(images - expected).max() < 1e-4, clip


def test_a_diffusers_flow_folder_reads_back_as_the_same_model(tmp_path):
    from difflab.interop import export_to_diffusers, load_diffusers

    net, sched = _unet(seed=4), FlowMatchSchedule(shift=3.0)
    out = export_to_diffusers(tmp_path / "e", unet_config=net.config,
                              state_dict=net.state_dict(), schedule=sched,
                              parameterization="flow")  # fmt: skip
    m = load_diffusers(out)
    assert m.parameterization == "flow" and m.schedule.shift == 3.0
    assert m.denoiser.time_scale == 1000.0
    for k, v in net.state_dict().items():  # the time rotation is undone exactly
        assert torch.allclose(m.unet.state_dict()[k], v, atol=1e-6), k
    with pytest.raises(ValueError, match="velocity"):
        export_to_diffusers(tmp_path / "x", unet_config=net.config,
                            state_dict=net.state_dict(), schedule=sched,
                            parameterization="x0")  # fmt: skip
    assert diffusion_settings(sched.to_config()) == {"schedule": "flow", "shift": 3.0}


@pytest.mark.parametrize(
    "option",
    [
        {"use_dynamic_shifting": True},
        {"use_karras_sigmas": True},
        {"shift_terminal": 0.1},
        {"invert_sigmas": True},
    ],  # fmt: skip
)
def test_flow_scheduler_grid_options_are_refused_in_one_line(tmp_path, option, capsys):
    from difflab.interop import export_to_diffusers

    net = _unet(seed=1)
    out = export_to_diffusers(tmp_path / "e", unet_config=net.config,
                              state_dict=net.state_dict(), schedule=FlowMatchSchedule(),
                              parameterization="flow")  # fmt: skip
    path = out / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **option}))
    err = _one_line_error(capsys, main(["sample", str(out), "--n", "2", "--out",
                                        str(tmp_path / "s.npz")]))  # fmt: skip
    assert next(iter(option)) in err and "scheduler_config.json" in err


@pytest.fixture(scope="module")
def flow_image_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowimg")
    write_bar_images(root / "imgs", n=24)
    run = root / "run"
    sets = ["data.image_size=16", "data.channels=1", "model.preset=tiny-ddpm", "train.steps=4",
            "train.batch_size=8", "train.log_every=2", "train.ckpt_every=2", "sample.steps=4",
            "sample.n=4", "train.warmup_steps=1", "diffusion.schedule=flow",
            "diffusion.shift=3", "model.parameterization=flow",
            "diffusion.t_sampling=logit-normal", "sample.sampler=flow-euler"]  # fmt: skip
    sets = [a for s in sets for a in ("--set", s)]
    code = main(["train", "--preset", "folder", "--out", str(run), "--data-dir",
                 str(root / "imgs"), "--no-progress", *sets])  # fmt: skip
    assert code == 0
    return run


def test_export_sample_and_import_a_flow_run(flow_image_run, tmp_path, capsys):
    """`difflab export` writes the flow scheduler; `difflab sample DIR` on the folder draws
    what the run draws (same seed, sampler, no clipping); `difflab import` makes a run of the
    flow process with the run's weights."""
    pytest.importorskip("diffusers")
    out = tmp_path / "export"
    assert main(["export", str(flow_image_run), str(out)]) == 0, capsys.readouterr().err
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler" and sched["shift"] == 3.0
    draws = []
    for src in (flow_image_run, out):
        npz = tmp_path / f"{len(draws)}.npz"
        args = ["sample", str(src), "--sampler", "flow-euler", "--steps", "3", "--n", "2",
                "--seed", "1", "--threshold", "none", "--no-progress",
                "--out", str(npz)]  # fmt: skip
        assert main(args) == 0, capsys.readouterr().err
        with np.load(npz) as data:
            draws.append(data["samples"].astype(int))
    assert np.abs(draws[0] - draws[1]).max() <= 1  # uint8 rounding of float round-off
    assert load_run(out).cfg.sample.sampler == "flow-euler"

    run = tmp_path / "imported"
    assert (
        main(
            [
                "import",
                str(out),
                "--out",
                str(run),
                "--preset",
                "folder",
                "--set",
                "data.image_size=16",
                "--set",
                "data.channels=1",
            ]
        )
        == 0
    ), capsys.readouterr().err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["diffusion"]["schedule"] == "flow" and cfg["diffusion"]["shift"] == 3.0
    assert cfg["model"]["parameterization"] == "flow"
    ema = ckpt.load_checkpoint(flow_image_run).tensors["ema"]
    got = ckpt.load_checkpoint(run).tensors["ema"]
    assert all(torch.allclose(got[k], ema[k], atol=1e-6) for k in ema)
