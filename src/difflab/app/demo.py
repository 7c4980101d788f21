"""``difflab demo``: a web page on a trained run to sample, guide and watch the reverse process.

    difflab demo RUN_DIR|DIFFUSERS_DIR [--port P] [--host H] [--share]

The page (a Gradio app, optional extra ``difflab[demo]``) has the controls of ``difflab sample``
that apply to the run: sampler (from the sampler table), steps, seed, number of images, class and
classifier-free guidance scale for class-conditional runs, eta for the samplers that have one,
an input image for image-to-image and super-resolution runs. The sample grid is drawn by
:func:`difflab.app.sampling.draw_samples` with the same seed handling as ``difflab sample``, so
the same settings give the same pixels. A slider walks through the sampler's steps and shows,
for the first :data:`TRAJECTORY_IMAGES` images, the sample x_t, the predicted clean data x0_hat
and the predicted noise eps_hat = (x_t - alpha_t x0_hat) / sigma_t [Ho 2020, Eq. 4 solved for
eps], all taken from the sampler callback and computed once per press of the button.

The library half of this module imports no gradio: :class:`DemoLimits`, :class:`DemoRequest`,
:func:`check_request`, :func:`draw_demo` and :func:`run_facts` are plain functions the tests
call directly. :func:`build_app` and :func:`launch` import gradio when called.

Safety of a shared page: requests beyond :class:`DemoLimits` (images, steps) are refused with a
message before any work; one sampling runs at a time per process (Gradio's queue with a
concurrency limit of one, and a lock), the rest wait in a queue of bounded length. The server
listens on 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from difflab import viz
from difflab.app.build import Built
from difflab.app.runs import load_run
from difflab.app.sampling import draw_samples
from difflab.data.images import to_uint8
from difflab.image_to_image import degrade, preview
from difflab.parameterization import eps_from_x0
from difflab.safe_io import atomic_write_text, read_json_object, say
from difflab.sampler_table import SAMPLER_NAMES, SAMPLER_TABLE

__all__ = [
    "DemoDraw",
    "DemoLimits",
    "DemoRequest",
    "TRAJECTORY_IMAGES",
    "build_app",
    "check_request",
    "draw_demo",
    "launch",
    "run_facts",
    "write_space_app",
]

TRAJECTORY_IMAGES = 4  # images whose every step the slider shows (memory: steps x 3 pictures)
INSTALL_HINT = "pip install 'difflab[demo]'"
GRID_SIDE, STEP_SIDE = 384, 192  # pixels the sample grid and the step pictures are enlarged to
GUIDANCE_LABEL = "guidance scale (blank: none; 0 unconditional, 1 conditional)"


@dataclass(frozen=True)
class DemoLimits:
    """The largest request the page accepts: ``max_images`` images (``max_points`` points for
    2-D runs) of at most ``max_steps`` sampler steps; ``queue`` requests may wait."""

    max_images: int = 64
    max_points: int = 5000
    max_steps: int = 250
    queue: int = 16

    def max_n(self, built: Built) -> int:
        return self.max_points if built.cfg.data.is_toy else self.max_images


@dataclass(frozen=True)
class DemoRequest:
    """One press of the button. ``image``: an uploaded picture, uint8 (H, W) or (H, W, C);
    ``label``/``guidance`` are used by class-conditional runs only, ``eta`` by samplers with
    an eta only (None: the run's or the sampler's default)."""

    sampler: str
    steps: int
    seed: int = 0
    n: int = 4
    label: int | None = None
    guidance: float | None = None
    eta: float | None = None
    image: np.ndarray | None = None


@dataclass
class DemoDraw:
    """What one request gives: ``samples`` (n, *data_shape) in the data's range; ``frames``:
    one (t, x_t, x0_hat, eps_hat) per sampler step for the first images, eps_hat None where the
    step belongs to another stage (a cascade's base run); ``shown_input``: the conditioning
    picture (degraded or low-resolution input) or None."""

    samples: Tensor
    frames: list[tuple[float, Tensor, Tensor, Tensor | None]]
    shown_input: Tensor | None = None


# ----------------------------------------------------------------------------- requests
def check_demo_run(built: Built, where: str | Path) -> None:
    """Refuse runs without a diffusion denoiser (classifiers, autoencoders, the 2015 model)."""
    if not built.kind.has_denoiser:
        raise ValueError(
            f"{where} is a {built.kind.name} run; the demo samples diffusion runs "
            "(a denoiser and a sampler)"
        )


def _whole(name: str, value: Any, lo: int, hi: int | None = None) -> int:
    """``value`` as an int in [lo, hi]; the page sends numbers as floats."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not math.isfinite(v) or v != int(v):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if v < lo or (hi is not None and v > hi):
        top = "" if hi is None else f" and at most {hi}"
        raise ValueError(f"{name} must be at least {lo}{top}, got {int(v)}")
    return int(v)


def _number(name: str, value: Any) -> float | None:
    if value is None or value == "":
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return v


def check_request(built: Built, req: DemoRequest, limits: DemoLimits) -> DemoRequest:
    """The request with whole numbers as ints and options that do not apply dropped; a request
    the run cannot serve or that asks for more than ``limits`` is a one-line ``ValueError``."""
    if req.sampler not in SAMPLER_TABLE:
        raise ValueError(
            f"unknown sampler {req.sampler!r}; choose one of: {', '.join(SAMPLER_NAMES)}"
        )
    steps = _whole("steps", req.steps, 1, limits.max_steps)
    n = _whole("number of images", req.n, 1, limits.max_n(built))
    seed = _whole("seed", req.seed, 0, 2**63 - 1)
    eta = _number("eta", req.eta) if "eta" in SAMPLER_TABLE[req.sampler].options else None
    if eta is not None and eta < 0:
        raise ValueError(f"eta must be >= 0, got {eta}")
    k = _classes(built)
    label = guidance = None
    if k > 0:
        label = _whole("class", 0 if req.label is None else req.label, 0, k - 1)
        guidance = None if built.kind.super_resolves else _number("guidance scale", req.guidance)
    image = req.image if _takes_image(built) else None
    if image is not None:
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim not in (2, 3) or min(image.shape[:2]) < 1:
            raise ValueError(f"the input image must be uint8 (H, W[, C]), got {image.shape}")
    if built.kind.conditions_on_images and image is None:
        raise ValueError("this image-to-image run needs an input image")
    return replace(req, sampler=req.sampler, steps=steps, n=n, seed=seed, eta=eta,
                   label=label, guidance=guidance, image=image)  # fmt: skip


def _classes(built: Built) -> int:
    """Classes the page offers: those of a class-conditional run that makes its own images."""
    return 0 if built.cfg.data.is_toy else built.cfg.model.num_classes


def _takes_image(built: Built) -> bool:
    return built.kind.conditions_on_images or built.kind.super_resolves


# ----------------------------------------------------------------------------- drawing
def draw_demo(
    built: Built, req: DemoRequest, *, progress: Callable[[int, int], None] | None = None
) -> DemoDraw:
    """Samples and the per-step trajectory of a checked request (:func:`check_request`).

    ``progress(i, steps)`` is called at every sampler step. The samples are those of
    ``difflab sample RUN --sampler S --steps K --seed SEED --n N [--class C --guidance G]``.
    """
    cond, shown = _conditioning(built, req)
    frames: list[tuple[float, Tensor, Tensor, Tensor | None]] = []

    def keep(info: dict) -> None:
        t = float(info["t"])
        x, x0 = info["x"][:TRAJECTORY_IMAGES].float().cpu(), info["x0_hat"][:TRAJECTORY_IMAGES]
        frames.append((t, x, x0.float().cpu(), _predicted_noise(built, x, x0.float().cpu(), t)))
        if progress is not None:
            progress(int(info["i"]), req.steps)

    options = {} if req.eta is None else {"eta": req.eta}
    x = draw_samples(
        built, req.n, sampler=req.sampler, steps=req.steps, seed=req.seed, cond=cond,
        guidance=req.guidance, callback=keep, **options,
    )  # fmt: skip
    return DemoDraw(x, frames, shown)


def _predicted_noise(built: Built, x: Tensor, x0_hat: Tensor, t: float) -> Tensor | None:
    """eps_hat at time t from x_t = alpha_t x0 + sigma_t eps; None at t = 0 or for a frame
    of another stage (a cascade's base run, of another shape)."""
    if built.kind.super_resolves and tuple(x.shape[1:]) != tuple(built.data_shape):
        return None  # the base run's step, on the base run's schedule
    alpha, sigma = built.schedule.alpha_sigma(torch.tensor([t], dtype=torch.float64))
    if float(sigma) <= 0:
        return None
    return eps_from_x0(x.double(), x0_hat.double(), alpha, sigma).float()


def _conditioning(built: Built, req: DemoRequest) -> tuple[Any, Tensor | None]:
    """The cond of draw_samples and the picture of the input the page shows."""
    n = req.n
    labels = None if req.label is None else torch.full((n,), req.label, dtype=torch.long)
    if req.image is None:
        return labels, None
    c, h, w = built.data_shape
    if built.kind.super_resolves:
        f = built.cfg.model.sr_factor
        low = image_tensor(req.image, c, (h // f, w // f))
        cond = {"image": low.expand(n, -1, -1, -1).contiguous()}
        return (cond if labels is None else {**cond, "class": labels}), low
    x0 = image_tensor(req.image, c, (h, w)).expand(n, -1, -1, -1).contiguous()
    task = built.cfg.model.image_task
    y = degrade(x0, task, generator=torch.Generator().manual_seed(req.seed))  # type: ignore
    return {"image": y}, preview(y[:1], task, c)  # type: ignore[arg-type]


def image_tensor(image: np.ndarray, channels: int, size: tuple[int, int]) -> Tensor:
    """An uploaded uint8 picture (H, W[, C]) as a (1, channels, *size) tensor in [-1, 1]:
    grey or RGB, resized (bicubic) to ``size``."""
    pil = Image.fromarray(np.ascontiguousarray(image)).convert("L" if channels == 1 else "RGB")
    pil = pil.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    a = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy())
    a = a[None] if a.ndim == 2 else a.permute(2, 0, 1)
    return a[None].float() / 127.5 - 1.0


# ----------------------------------------------------------------------------- pictures
def picture(built: Built, x: Tensor, *, scale: float = 1.0) -> np.ndarray:
    """A uint8 (H, W, 3) or (H, W) picture of a batch: a grid of images clamped to [-1, 1]
    after dividing by ``scale`` (latents with other channel counts: their first channel), or a
    scatter plot of 2-D points."""
    if built.cfg.data.is_toy:
        return _scatter_picture(x)
    x = x / scale
    if x.shape[1] not in (1, 3):
        x = x[:, :1]
    return _plain(viz.make_grid(x.clamp(-1, 1)))


def _plain(a: np.ndarray) -> np.ndarray:
    """(H, W, 1) -> (H, W): a grey picture as image libraries take it."""
    return a[..., 0] if a.shape[-1] == 1 else a


def enlarged(a: np.ndarray, side: int) -> np.ndarray:
    """``a`` repeated k times along both axes (nearest neighbour, pixels kept exactly), the
    largest k >= 1 whose longer side stays within ``side``: browsers show small grids tiny."""
    k = max(1, side // max(a.shape[:2]))
    return a.repeat(k, axis=0).repeat(k, axis=1)


def _scatter_picture(x: Tensor) -> np.ndarray:
    import matplotlib.pyplot as plt

    ax = viz.scatter(x, lim=3.0, s=4.0)
    fig = ax.figure
    fig.canvas.draw()
    a = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return a


def sample_grid(built: Built, samples: Tensor) -> np.ndarray:
    """The page's sample grid: :func:`difflab.viz.make_grid` of the uint8-rounded samples (the
    pixels ``difflab sample`` stores) :func:`enlarged` to ``GRID_SIDE``, or a scatter plot for
    2-D runs."""
    if built.cfg.data.is_toy:
        return _scatter_picture(samples)
    return enlarged(_plain(viz.make_grid(to_uint8(samples).float() / 127.5 - 1.0)), GRID_SIDE)


def frame_pictures(built: Built, draw: DemoDraw) -> list[tuple]:
    """(caption, x_t, x0_hat, eps_hat) pictures for every step: x_t divided by
    sqrt(alpha_t^2 + sigma_t^2) (unit scale on any schedule), eps_hat by 3 (+-3 sigma fill the
    range); a missing eps_hat is a grey picture."""
    out = []
    for i, (t, x, x0, eps) in enumerate(draw.frames):
        a, s = built.schedule.alpha_sigma(torch.tensor([t], dtype=torch.float64))
        norm = float((a**2 + s**2).sqrt()) if x.shape[1:] == built.data_shape else 1.0
        xt = picture(built, x, scale=norm)
        eps_pic = np.full_like(xt, 128) if eps is None else picture(built, eps, scale=3.0)
        caption = f"step {i + 1}/{len(draw.frames)}: t = {t:.4g}"
        out.append((caption, xt, picture(built, x0), eps_pic))
    return out


# ----------------------------------------------------------------------------- facts
def run_facts(built: Built, where: str | Path) -> list[tuple[str, str]]:
    """(name, value) rows about the run: its config and the figures of its ``finished.json``
    (steps trained, quality), for the table beside the samples."""
    cfg = built.cfg
    rows = [
        ("run", str(where)),
        ("preset", cfg.preset),
        ("run kind", built.kind.name),
        ("data", f"{cfg.data.name}, shape {tuple(built.data_shape)}"),
        ("network", f"{cfg.model.net} {cfg.model.preset}"),
        ("parameterization", cfg.model.parameterization),
        ("schedule", f"{cfg.diffusion.schedule}, T = {cfg.diffusion.T}"),
        ("classes", str(cfg.model.num_classes or "unconditional")),
        ("default sampler", f"{cfg.sample.sampler}, {cfg.sample.steps} steps"),
    ]
    path = Path(where) / "finished.json"
    if path.is_file():
        info = read_json_object(path, missing="not found", invalid="not readable", error=ValueError)
        rows += [(k, _fmt(v)) for k, v in _flat(info).items()]
    return rows


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
    return out


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def facts_markdown(rows: list[tuple[str, str]]) -> str:
    lines = ["| run fact | value |", "|---|---|"]
    lines += [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the app
def _gradio() -> Any:
    """The optional gradio package, or a one-line error naming the extra."""
    try:
        import gradio  # the optional extra difflab[demo]: imported only by this command
    except ImportError:
        raise ValueError(f"the demo needs gradio: {INSTALL_HINT}") from None
    return gradio


def build_app(built: Built, facts: list[tuple[str, str]], limits: DemoLimits) -> Any:
    """The Gradio ``Blocks`` page on a loaded run (see the module docstring)."""
    gr = _gradio()
    cfg, k = built.cfg, _classes(built)
    lock = threading.Lock()  # one sampling at a time, whatever the queue's settings
    tracker = gr.Progress()  # a Progress default makes gradio show the bar

    def on_sample(sampler, steps, seed, n, label, guidance, eta, image, progress=tracker):
        req = DemoRequest(sampler, steps, seed, n, label, guidance, eta, image)
        try:
            req = check_request(built, req, limits)
            progress(0.0, desc="waiting for the sampler")
            with lock:
                draw = draw_demo(
                    built, req, progress=lambda i, m: progress(min(i + 1, m) / m, desc="sampling")
                )
        except ValueError as e:
            raise gr.Error(str(e)) from None
        pics = frame_pictures(built, draw)
        last = len(pics) - 1
        given = draw.shown_input
        given = None if given is None else enlarged(picture(built, given), STEP_SIDE)
        return (sample_grid(built, draw.samples), pics,
                gr.update(maximum=max(last, 1), value=max(last, 0)),
                *_step_outputs(pics, last), given)  # fmt: skip

    def on_step(pics, i):
        return _step_outputs(pics, int(i or 0))

    with gr.Blocks(title=f"difflab demo: {cfg.preset}", analytics_enabled=False) as app:
        gr.Markdown(f"## difflab demo: {cfg.preset} ({built.kind.name})")
        with gr.Row():
            with gr.Column(scale=1):
                sampler = gr.Dropdown(list(SAMPLER_NAMES), value=cfg.sample.sampler,
                                      label="sampler", elem_id="sampler")  # fmt: skip
                first = min(cfg.sample.steps, limits.max_steps)
                steps = gr.Slider(1, limits.max_steps, value=first, step=1, label="steps",
                                  elem_id="steps")  # fmt: skip
                seed = gr.Number(0, precision=0, minimum=0, label="seed", elem_id="seed")
                max_n = limits.max_n(built)
                n = gr.Slider(1, max_n, value=min(16, max_n), step=1,
                              label="number of images", elem_id="n")  # fmt: skip
                label = gr.Number(0, precision=0, label=f"class (0..{k - 1})", visible=k > 0,
                                  elem_id="label")  # fmt: skip
                # text boxes: blank is "not set" (a number box would send 0)
                guided = k > 0 and not built.kind.super_resolves  # as difflab sample
                guidance = gr.Textbox("", label=GUIDANCE_LABEL, visible=guided,
                                      elem_id="guidance")  # fmt: skip
                eta = gr.Textbox("", label="eta (blank: the sampler's default)", elem_id="eta",
                                 visible=_has_eta(cfg.sample.sampler))  # fmt: skip
                image = gr.Image(type="numpy", label="input image", visible=_takes_image(built),
                                 elem_id="input")  # fmt: skip
                button = gr.Button("Sample", variant="primary", elem_id="sample")
                gr.Markdown(facts_markdown(facts), elem_id="facts")
            with gr.Column(scale=2):
                grid = gr.Image(label="samples", format="png", interactive=False,
                                elem_id="samples")  # fmt: skip
                step = gr.Slider(0, 1, value=0, step=1, label="sampler step (first images)",
                                 elem_id="step")  # fmt: skip
                caption = gr.Markdown(elem_id="caption")
                with gr.Row():
                    views = [gr.Image(label=name, format="png", interactive=False, elem_id=eid)
                             for name, eid in (("x_t", "xt"), ("predicted x0", "x0"),
                                               ("predicted noise", "eps"))]  # fmt: skip
                shown = gr.Image(label="conditioning input", format="png", interactive=False,
                                 visible=_takes_image(built), elem_id="shown")  # fmt: skip
        frames = gr.State([])
        button.click(
            on_sample, [sampler, steps, seed, n, label, guidance, eta, image],
            [grid, frames, step, caption, *views, shown], api_name="sample",
            concurrency_limit=1,
        )  # fmt: skip
        step.change(on_step, [frames, step], [caption, *views], api_name="step", queue=False)
        sampler.change(lambda s: gr.update(visible=_has_eta(s)), sampler, eta, api_name=False)
    app.queue(max_size=limits.queue, default_concurrency_limit=1)
    return app


def _has_eta(sampler: str) -> bool:
    return sampler in SAMPLER_TABLE and "eta" in SAMPLER_TABLE[sampler].options


def _step_outputs(pics: list, i: int) -> tuple:
    """The caption and the three pictures of step i (enlarged here: the state keeps them small)."""
    if not pics:
        return "", None, None, None
    caption, *images = pics[max(0, min(i, len(pics) - 1))]
    return (caption, *(enlarged(a, STEP_SIDE) for a in images))


def launch(
    where: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    share: bool = False,
    limits: DemoLimits | None = None,
    block: bool = True,
) -> Any:
    """Load a run directory or diffusers folder and serve its demo page on ``host:port``
    (a free port from 7860 when None); ``share``: also through a public Gradio link.
    ``block=False`` returns the running app (tests)."""
    _gradio()  # before loading the run: a missing extra is one line at once
    limits = limits or DemoLimits()
    built = load_run(where)
    check_demo_run(built, where)
    app = build_app(built, run_facts(built, where), limits)
    say(f"difflab demo of {where} on http://{host}:{port or 'the first free port from 7860'}")
    # the trajectories of the last visitors only (the state holds every step's pictures)
    app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=not block,
               ssr_mode=False, state_session_capacity=64)  # fmt: skip
    return app


# ----------------------------------------------------------------------------- a Space
SPACE_APP = '''"""The difflab demo of this model: pip install -r requirements.txt; python app.py

As a Hugging Face Space (Gradio SDK) the folder runs as it is; locally the page is served on
127.0.0.1 (GRADIO_SERVER_NAME and GRADIO_SERVER_PORT change the address).
"""

import os
from pathlib import Path

from difflab.app.demo import launch

if __name__ == "__main__":
    launch(
        Path(__file__).resolve().parent,
        host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )
'''
SPACE_REQUIREMENTS = "difflab[demo]\n"


def write_space_app(folder: str | Path) -> list[Path]:
    """Write ``app.py`` and ``requirements.txt`` into an exported folder, so that ``python
    app.py`` there (or a Gradio Space of the folder) serves :func:`launch` on its weights."""
    folder = Path(folder)
    paths = [folder / "app.py", folder / "requirements.txt"]
    for path, text in zip(paths, (SPACE_APP, SPACE_REQUIREMENTS)):
        atomic_write_text(path, text)
    return paths
