"""Speed a user feels: progress bars, timing metadata, inference mode and torch.compile.

The compile tests compare compiled and eager networks on the same inputs (the oracle is the
eager network: compilation must not change the function, up to float32 reassociation); they
are skipped where TorchInductor cannot run (no C++ compiler).
"""

import copy
import json

import numpy as np
import pytest
import torch

from difflab.app.cli import main
from difflab.app.config import apply_overrides, get_preset
from difflab.app.runs import build
from difflab.app.sampling import draw_samples
from difflab.inference import (
    GraphedNetwork,
    compile_network,
    compile_unavailable,
    flatten_call,
    inference_context,
    is_compiled,
    unflatten_call,
)
from difflab.nn.unet import build_unet
from difflab.parameterization import ModelDenoiser
from difflab.samplers import nfe

SETTINGS = ["train.steps=20", "train.batch_size=64", "train.log_every=10", "train.ckpt_every=10",
            "model.hidden=32", "model.depth=2", "sample.n=100", "sample.steps=10",
            "sample.sampler=ddim"]  # fmt: skip
FAST = [arg for s in SETTINGS for arg in ("--set", s)]

needs_compile = pytest.mark.skipif(
    compile_unavailable("cpu") is not None, reason=str(compile_unavailable("cpu"))
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("speed") / "run"
    assert main(["train", "--preset", "moons", "--out", str(run), "--no-progress", *FAST]) == 0
    return run


def test_sample_shows_progress_and_writes_its_timing(tiny_run, tmp_path, capsys):
    capsys.readouterr()
    out = tmp_path / "s.npz"
    args = ["sample", str(tiny_run), "--n", "50", "--batch-size", "20", "--sampler", "heun",
            "--steps", "5", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    err = capsys.readouterr().err
    # the bar counts images to the total over three batches (20 + 20 + 10), with a rate
    assert "50/50" in err and "img/s" in err and "step 5/5" in err, err
    timing = json.loads(out.with_suffix(".json").read_text())
    assert timing["sampler"] == "heun" and timing["steps"] == 5 and timing["n"] == 50
    assert timing["nfe"] == nfe("heun", 5) == 9  # Heun: 2 evaluations per step, 1 on the last
    assert timing["device"] == "cpu" and timing["seconds"] > 0
    assert timing["images_per_s"] == pytest.approx(50 / timing["seconds"], rel=0.01)

    assert main([*args, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""
    # the bar changes nothing about the samples
    x = np.load(out)["samples"]
    assert main([*args[:-1], str(tmp_path / "t.npz"), "--no-progress"]) == 0
    assert np.array_equal(np.load(tmp_path / "t.npz")["samples"], x)


def test_eval_and_nll_show_progress_unless_asked_not_to(tiny_run, capsys):
    capsys.readouterr()
    assert main(["eval", str(tiny_run), "--n", "200", "--steps", "4"]) == 0
    assert "200/200" in capsys.readouterr().err
    nll = ["nll", str(tiny_run), "--n", "30", "--vlb-stride", "100", "--ode-steps", "3"]
    assert main(nll) == 0
    assert "30/30" in capsys.readouterr().err
    assert main(["eval", str(tiny_run), "--n", "200", "--steps", "4", "--no-progress"]) == 0
    assert main([*nll, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_a_refused_option_is_one_line_without_a_bar(tiny_run, capsys):
    capsys.readouterr()
    code = main(["sample", str(tiny_run), "--sampler", "ddpm", "--eta", "0.5", "--n", "8"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("difflab: error:") and "\n" not in err, err


def _moons(**train):
    cfg = apply_overrides(get_preset("moons"), ["model.hidden=32", "model.depth=2"])
    return build(cfg, device=torch.device("cpu"))


def test_sampling_runs_in_inference_mode_unless_guidance_needs_gradients():
    built = _moons()
    seen = []
    built.model.register_forward_hook(lambda *a: seen.append(torch.is_inference_mode_enabled()))
    draw_samples(built, 8, sampler="ddim", steps=3)
    assert seen and all(seen)
    # inside the no-gradient context of classifier guidance autograd still works
    with inference_context("cpu", needs_grad=True):
        assert not torch.is_inference_mode_enabled()
        with torch.enable_grad():
            x = torch.ones(3, requires_grad=True)
            (g,) = torch.autograd.grad((x**2).sum(), x)
    assert torch.equal(g, 2 * torch.ones(3))


def test_compile_without_a_compiler_is_one_line(tiny_run, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("CXX", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no compiler on it
    assert "C++ compiler" in str(compile_unavailable("cpu"))
    capsys.readouterr()
    code = main(["sample", str(tiny_run), "--compile", "--n", "8", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot compile the network" in err and "\n" not in err, err


def _conv_formats(model: torch.nn.Module) -> list[bool]:
    """Records, per forward of a 3x3 convolution with several input channels, whether its
    weight was channels-last (a weight with one input channel is both formats at once)."""
    conv = next(
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1 and m.kernel_size == (3, 3)
    )
    seen: list[bool] = []
    fmt = torch.channels_last
    conv.register_forward_hook(
        lambda m, i, o: seen.append(m.weight.is_contiguous(memory_format=fmt))
    )
    return seen


def test_cpu_sampling_runs_channels_last_and_gives_the_weights_back(monkeypatch):
    """On a CPU the U-Net samples with channels-last weights (the lever of BENCHMARKS.md), the
    samples are those of the contiguous network up to float32 rounding, and afterwards the same
    parameters hold contiguous ordinary tensors that training can update in place."""
    import contextlib

    import difflab.app.sampling as sampling

    cfg = apply_overrides(get_preset("mnist"), ["data.image_size=8", "model.preset=tiny"])
    built = build(cfg, device=torch.device("cpu"), load_data=False)
    params = list(built.model.parameters())
    seen = _conv_formats(built.model)
    x = draw_samples(built, 6, sampler="dpm++2m-sde", steps=4, seed=3)
    assert seen and all(seen)
    assert all(a is b for a, b in zip(built.model.parameters(), params, strict=True))
    assert all(p.is_contiguous() and not p.is_inference() for p in params)
    with torch.no_grad():
        params[0].add_(0.0)  # an in-place update, as an optimizer or the EMA makes

    seen.clear()
    monkeypatch.setattr(sampling, "channels_last", lambda *a: contextlib.nullcontext())
    x_nchw = draw_samples(built, 6, sampler="dpm++2m-sde", steps=4, seed=3)
    assert seen and not any(seen)
    assert torch.allclose(x, x_nchw, atol=1e-4), (x - x_nchw).abs().max()


@needs_compile
def test_compiled_sampling_and_training_match_eager():
    """Same samples from the same noise, and the same training losses, compiled or not; the
    compiled model keeps its parameter names (checkpoints stay loadable by eager runs)."""
    from difflab.app.build import make_batch_fn
    from difflab.app.training import make_loss_fn
    from difflab.train import Trainer

    torch._dynamo.reset()
    eager, compiled = _moons(), _moons()
    compiled.model.load_state_dict(eager.model.state_dict())
    kw = dict(sampler="dpm++2m-sde", steps=4, seed=1, batch_size=32)
    x_eager = draw_samples(eager, 64, **kw)
    x_comp = draw_samples(compiled, 64, compile=True, **kw)
    assert is_compiled(compiled.model)
    assert torch.allclose(x_comp, x_eager, atol=1e-4), (x_comp - x_eager).abs().max()

    losses = {}
    for flag in (False, True):
        torch.manual_seed(0)
        b = _moons()
        b.model.load_state_dict(eager.model.state_dict())
        trainer = Trainer(
            b.model, batch_fn=make_batch_fn(b), loss_fn=make_loss_fn(b, {}), lr=1e-3,
            batch_size=b.cfg.train.batch_size, compile=flag,
        )  # fmt: skip
        assert is_compiled(trainer.model) == flag and not is_compiled(trainer.ema.model)
        losses[flag] = [float(trainer.train_step()["loss"]) for _ in range(3)]
        assert set(trainer.tensors()["model"]) == set(eager.model.state_dict())
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


# --- CUDA graphs: the signature logic runs on any machine; the replay itself needs CUDA ------


@pytest.mark.parametrize(
    "cond",
    [None, torch.arange(3), {"class": torch.arange(3), "image": torch.ones(3, 1, 4, 4)}],
    ids=["none", "tensor", "dict"],
)
def test_a_graphed_call_flattens_and_unflattens_to_the_same_arguments(cond):
    x, t = torch.randn(3, 1, 4, 4), torch.rand(3)
    tensors, sig = flatten_call(x, t, cond)
    x2, t2, cond2 = unflatten_call(tensors, sig)
    assert x2 is x and t2 is t
    if isinstance(cond, dict):
        assert cond2.keys() == cond.keys() and all(cond2[k] is cond[k] for k in cond)
    else:
        assert cond2 is cond
    # the signature tells calls apart by shape, dtype and structure: one graph each
    assert flatten_call(x[:2], t[:2], None)[1] != flatten_call(x, t, None)[1]
    assert flatten_call(x.double(), t, None)[1] != flatten_call(x, t, None)[1]
    assert flatten_call(x, t, None)[1] != flatten_call(x, t, torch.arange(3))[1]
    assert flatten_call(x, t, {"odd": [1]}) is None  # not graphed: run as it is


def test_a_graphed_network_runs_as_it_is_off_cuda():
    net = build_unet("tiny-ddpm").eval()
    graphed = GraphedNetwork(net)
    x, t = torch.randn(2, 1, 16, 16), torch.rand(2) * 1000
    with torch.inference_mode():
        assert torch.equal(graphed(x, t), net(x, t))
    assert graphed.config is net.config  # the wrapped network's attributes show through
    assert not graphed._graphs


def test_cuda_graph_on_a_cpu_run_is_one_line(tiny_run, capsys):
    capsys.readouterr()
    code = main(["sample", str(tiny_run), "--n", "8", "--cuda-graph", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--cuda-graph needs a CUDA device" in err and "\n" not in err, err
    code = main(["sample", str(tiny_run), "--n", "8", "--cuda-graph", "--compile"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "cannot be combined" in err and "\n" not in err, err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_graphed_sampling_matches_eager_on_cuda():
    """The replayed graph must compute the eager network on *each call's* inputs (a stale
    static buffer or an output overwritten by the next replay would fail here)."""
    torch.manual_seed(0)
    net = build_unet("tiny-ddpm", num_classes=4).cuda().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    graphed = GraphedNetwork(net)
    with torch.inference_mode():
        outs, refs = [], []
        for i in range(4):
            x = torch.randn(5, 1, 16, 16, device="cuda")
            t = torch.full((5,), 100.0 * (i + 1), device="cuda")
            y = torch.arange(5, device="cuda") % 4
            outs.append(graphed(x, t, y))
            refs.append(net(x, t, y))
        for out, ref in zip(outs, refs):
            torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
        assert len(graphed._graphs) == 1
        graphed(torch.randn(2, 1, 16, 16, device="cuda"), torch.rand(2, device="cuda"), y[:2])
        assert len(graphed._graphs) == 2  # a new batch size captures its own graph
    from difflab.samplers import sample as draw
    from difflab.schedules import DiscreteSchedule

    sch = DiscreteSchedule.from_name("linear", 1000)
    a, b = (
        draw(
            ModelDenoiser(m, sch),
            sch,
            (6, 1, 16, 16),
            sampler="dpm++2m",
            steps=8,
            device="cuda",
            generator=torch.Generator().manual_seed(1),
            cond=torch.arange(6, device="cuda") % 4,
        )  # fmt: skip
        for m in (net, graphed)
    )
    torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(
    not torch.cuda.is_available() or compile_unavailable("cuda") is not None,
    reason="needs CUDA and torch.compile",
)
def test_graphed_compiled_network_matches_eager_on_cuda():
    """A CUDA graph of the *compiled* network computes the eager network on each call's inputs.
    `difflab sample` refuses --cuda-graph with --compile until this passes on a GPU: the GPU
    benchmark that led to the refusal compared samples with a reference of another batch size."""
    torch.manual_seed(0)
    net = build_unet("tiny-ddpm").cuda().eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    eager = copy.deepcopy(net)
    graphed = GraphedNetwork(compile_network(net, "cuda"))
    with torch.inference_mode():
        for i in range(3):
            x = torch.randn(8, 1, 16, 16, device="cuda")
            t = torch.full((8,), 200.0 * (i + 1), device="cuda")
            torch.testing.assert_close(graphed(x, t), eager(x, t), rtol=1e-3, atol=1e-3)


@pytest.mark.skipif(
    not torch.cuda.is_available() or compile_unavailable("cuda") is not None,
    reason="needs CUDA and torch.compile",
)
def test_training_with_cuda_graphs_matches_eager_on_cuda():
    """`train.compile_mode=reduce-overhead` (the compiled forward and backward replayed from
    CUDA graphs) takes the same steps as eager training: a static buffer left stale between
    steps, or a gradient read after the next replay overwrote it, would drift the losses."""
    from difflab.objectives import diffusion_loss
    from difflab.schedules import DiscreteSchedule
    from difflab.train import Trainer

    sched = DiscreteSchedule.from_name("linear", 1000)
    torch.manual_seed(0)
    init = build_unet("tiny-ddpm").state_dict()
    data = torch.randn(256, 1, 16, 16).clamp(-1, 1)
    losses = {}
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        net = build_unet("tiny-ddpm").cuda()
        net.load_state_dict(init)
        den = ModelDenoiser(net, sched)
        trainer = Trainer(
            net, lr=1e-3, batch_size=32, device="cuda", seed=0,
            batch_fn=lambda step, g: data[torch.randint(256, (32,), generator=g)].cuda(),
            loss_fn=lambda x, g, den=den: (diffusion_loss(den, x, generator=g).loss, {}),
            compile=mode is not None, compile_mode=mode or "default",
        )  # fmt: skip
        losses[mode] = [float(trainer.train_step()["loss"]) for _ in range(8)]
    assert losses["reduce-overhead"] == pytest.approx(losses[None], rel=1e-3)
