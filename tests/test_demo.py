"""``difflab demo``: the web page on a run, its pieces, its refusals, and a real browser.

The pieces (request checks, drawing, the trajectory's predicted noise, run facts) are tested
without a server. The server tests start ``difflab demo`` on a tiny trained run on a free local
port and drive it through the Gradio client and through headless Chromium (Debian's
``chromium`` and ``chromium-driver``; skipped with the reason where they are not installed):
the page's image must have the pixels ``difflab sample`` writes for the same settings.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from difflab.app.cli import main
from difflab.app.config import apply_overrides, get_preset
from difflab.app.demo import (
    DemoLimits,
    DemoRequest,
    check_request,
    draw_demo,
    frame_pictures,
    run_facts,
    sample_grid,
)
from difflab.app.runs import build, load_run
from difflab.app.sampling import draw_samples
from helpers import randomise, write_bar_images

SRC = Path(__file__).resolve().parents[1] / "src"
# no x0 clipping (sample.threshold): the trajectory's x0_hat is then the network's own
TINY = ["data.image_size=16", "data.channels=1", "model.preset=tiny-ddpm", "sample.steps=3",
        "sample.sampler=ddim", "sample.n=4",
        "sample.threshold=none"]  # fmt: skip
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A run of the folder preset with the tiny DDPM U-Net, trained for two steps."""
    root = tmp_path_factory.mktemp("demo")
    write_bar_images(root / "imgs", n=16)
    sets = [*TINY, "train.steps=2", "train.batch_size=8", "train.log_every=1",
            "train.ckpt_every=2", "train.warmup_steps=1"]  # fmt: skip
    sets = [a for s in sets for a in ("--set", s)]
    code = main(["train", "--preset", "folder", "--out", str(root / "run"), "--data-dir",
                 str(root / "imgs"), "--no-progress", *sets])  # fmt: skip
    assert code == 0
    return root / "run"


@pytest.fixture(scope="module")
def cond_built():
    """A class-conditional tiny run (random weights: the checks need no quality, only an
    output that depends on the label)."""
    cfg = apply_overrides(get_preset("folder"), [*TINY, "model.num_classes=3"])
    built = build(cfg, device=torch.device("cpu"), load_data=False)
    randomise(built.model, std=0.05)
    return built


def _cli_pixels(run_dir: Path, tmp: Path, *, sampler: str, steps: int, seed: int, n: int):
    """The samples ``difflab sample`` writes (uint8 (n, C, H, W)) for these settings."""
    out = tmp / f"cli-{sampler}-{steps}-{seed}-{n}.npz"
    code = main(["sample", str(run_dir), "--sampler", sampler, "--steps", str(steps), "--seed",
                 str(seed), "--n", str(n), "--out", str(out), "--no-progress"])  # fmt: skip
    assert code == 0
    with np.load(out) as data:
        return data["samples"]


def _grid_of(built, pixels: np.ndarray) -> np.ndarray:
    """The page's grid of given uint8 samples."""
    return sample_grid(built, torch.from_numpy(pixels).float() / 127.5 - 1.0)


# ----------------------------------------------------------------------------- the pieces
def test_requests_beyond_the_limits_or_the_run_are_refused_in_one_line(run, cond_built):
    built = load_run(run)
    limits = DemoLimits(max_images=8, max_steps=50)
    ok = DemoRequest("ddim", 3, seed=1, n=2)
    bad = {
        "steps must be at least 1": {"steps": 0},
        "steps must be at least 1 and at most 50": {"steps": 51},
        "number of images must be at least 1 and at most 8": {"n": 10**6},
        "unknown sampler 'nope'; choose one of: ddpm": {"sampler": "nope"},
        "seed must be a whole number": {"seed": 1.5},
        "steps must be a whole number": {"steps": float("nan")},
        "eta must be >= 0": {"eta": -1.0},
        "eta must be a finite number": {"eta": float("inf")},
    }
    for message, change in bad.items():
        with pytest.raises(ValueError, match="^" + message.replace("(", r"\(")) as err:
            check_request(built, DemoRequest(**{**ok.__dict__, **change}), limits)
        assert "\n" not in str(err.value)
    # floats from the page become ints; options the run or sampler lacks are dropped
    req = check_request(built, DemoRequest("ddpm", 3.0, seed=2.0, n=2.0, label=7, eta=0.5),
                        limits)  # fmt: skip
    assert (req.steps, req.seed, req.n, req.label, req.eta) == (3, 2, 2, None, None)
    assert type(req.steps) is int and type(req.n) is int
    assert check_request(built, DemoRequest("ddim", 3, eta=0.5), limits).eta == 0.5
    with pytest.raises(ValueError, match=r"class must be at least 0 and at most 2, got 3"):
        check_request(cond_built, DemoRequest("ddim", 3, label=3), limits)
    req = check_request(cond_built, DemoRequest("ddim", 3, label=2, guidance=1.5), limits)
    assert (req.label, req.guidance) == (2, 1.5)


def test_the_draw_is_the_cli_draw_and_the_trajectory_is_the_samplers(run, tmp_path):
    """Same seed, same pixels as ``difflab sample``; one frame per sampler step whose
    predicted noise is the denoiser's (a swapped alpha/sigma or x_t/x0 fails)."""
    built = load_run(run)
    req = check_request(built, DemoRequest("ddim", 4, seed=5, n=3), DemoLimits())
    seen = []
    draw = draw_demo(built, req, progress=lambda i, m: seen.append((i, m)))
    cli = _cli_pixels(run, tmp_path, sampler="ddim", steps=4, seed=5, n=3)
    assert np.array_equal(sample_grid(built, draw.samples), _grid_of(built, cli))
    assert seen == [(i, 4) for i in range(4)] and len(draw.frames) == 4
    ts = [t for t, *_ in draw.frames]
    assert ts == sorted(ts, reverse=True) and ts[0] > ts[-1] > 0
    for t, x, x0, eps in draw.frames:
        with torch.no_grad():
            pred = built.denoiser(x, torch.full((x.shape[0],), t, dtype=torch.float64))
        torch.testing.assert_close(x0, pred.x0.float(), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(eps, pred.eps.float(), atol=1e-4, rtol=1e-3)
    pics = frame_pictures(built, draw)
    assert [p[0] for p in pics][0].startswith("step 1/4: t = ")
    assert all(p[1].shape == p[2].shape == p[3].shape for p in pics)
    # a new seed, new samples
    other = draw_demo(built, check_request(built, DemoRequest("ddim", 4, seed=6, n=3),
                                           DemoLimits()))  # fmt: skip
    assert not torch.equal(other.samples, draw.samples)


def test_class_and_guidance_reach_the_sampler(cond_built):
    """The label and the classifier-free guidance scale of the page are those draw_samples
    gets (another label or no guidance changes the samples of this random network)."""
    limits = DemoLimits()

    def demo(**kw):
        return draw_demo(cond_built, check_request(cond_built, DemoRequest("ddim", 2, n=2, **kw),
                                                   limits)).samples  # fmt: skip

    expected = draw_samples(cond_built, 2, sampler="ddim", steps=2, seed=0,
                            cond=torch.full((2,), 1), guidance=2.0)  # fmt: skip
    assert torch.equal(demo(label=1, guidance=2.0), expected)
    assert not torch.equal(demo(label=2, guidance=2.0), expected)
    assert not torch.equal(demo(label=1), expected)


def test_an_uploaded_image_is_degraded_by_the_runs_task_and_restored():
    """Image-to-image runs: the upload, resized to the data shape, degraded by the run's task
    with the request's seed, is the conditioning image; none is refused."""
    from difflab.app.demo import image_tensor
    from difflab.image_to_image import degrade

    cfg = apply_overrides(get_preset("folder"), [*TINY, "model.image_task=restore"])
    built = build(cfg, device=torch.device("cpu"), load_data=False)
    randomise(built.model, std=0.05)
    limits = DemoLimits()
    with pytest.raises(ValueError, match="needs an input image"):
        check_request(built, DemoRequest("ddim", 2, n=2), limits)
    upload = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    req = check_request(built, DemoRequest("ddim", 2, seed=3, n=2, image=upload), limits)
    draw = draw_demo(built, req)
    x0 = image_tensor(upload, 1, (16, 16))
    assert x0.shape == (1, 1, 16, 16) and x0.min() >= -1 and x0.max() <= 1
    y = degrade(x0.expand(2, -1, -1, -1), "restore", generator=torch.Generator().manual_seed(3))
    expected = draw_samples(built, 2, sampler="ddim", steps=2, seed=3, cond={"image": y})
    assert torch.equal(draw.samples, expected)
    torch.testing.assert_close(draw.shown_input, y[:1].clamp(-1, 1))


def test_run_facts_show_the_finished_run(run):
    facts = dict(run_facts(load_run(run), run))
    assert facts["preset"] == "folder" and facts["step"] == "2"
    assert facts["network"] == "unet tiny-ddpm" and facts["run kind"] == "diffusion-image"
    assert "last.loss" in facts


def test_the_page_samples_one_request_at_a_time(run):
    """The sample event runs one at a time with a bounded queue; the slider event is a lookup
    in the session's pictures (no sampling)."""
    pytest.importorskip("gradio")
    from difflab.app.demo import build_app

    built = load_run(run)
    app = build_app(built, run_facts(built, run), DemoLimits(queue=5))
    fns = {f.api_name: f for f in app.fns.values()}
    assert fns["sample"].concurrency_limit == 1 and app._queue.max_size == 5
    assert fns["step"].queue is False


def test_demo_without_gradio_is_one_line(run, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio raises ImportError
    assert main(["demo", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "difflab: error: the demo needs gradio: pip install 'difflab[demo]'"


def test_help_lists_demo_without_importing_torch_or_gradio():
    code = ("import sys; from difflab.app.cli import _parser; h = _parser().format_help(); "
            "assert 'demo' in h, h; bad = [m for m in ('torch', 'gradio') if m in sys.modules]; "
            "assert not bad, bad")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ----------------------------------------------------------------------------- the server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A demo server process; ``url`` once it listens."""

    def __init__(self, args: list[str], *, cwd: Path | None = None, env: dict | None = None):
        self.port = _free_port()
        self.log = Path(tempfile.mkdtemp()) / "server.log"
        env = {**os.environ, "PYTHONPATH": str(SRC), "GRADIO_ANALYTICS_ENABLED": "False",
               "GRADIO_SERVER_PORT": str(self.port), **(env or {})}  # fmt: skip
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, *[a.replace("PORT", str(self.port)) for a in args]],
                stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=env,
            )  # fmt: skip
        self.url = f"http://127.0.0.1:{self.port}/"
        deadline = time.monotonic() + 240
        while "Running on local URL" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"the demo did not start:\n{self.text()}")
            time.sleep(0.3)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@pytest.fixture(scope="module")
def server(run):
    pytest.importorskip("gradio")
    s = Server(["-m", "difflab", "demo", str(run), "--port", "PORT", "--max-n", "8"])
    yield s
    s.stop()


def _client(url: str):
    gradio_client = pytest.importorskip("gradio_client")
    return gradio_client.Client(url, verbose=False)


def _request(client, *, sampler="ddim", steps=3, seed=0, n=4, eta=None):
    return client.predict(sampler, steps, seed, n, 0, None, eta, None, api_name="/sample")


def test_the_server_listens_on_localhost_only(server):
    assert f"Running on local URL:  http://127.0.0.1:{server.port}" in server.text()
    with socket.create_connection(("127.0.0.1", server.port), timeout=5):
        pass
    address = _outward_address()
    if address is None:
        pytest.skip("this machine has no network interface besides the loopback")
    with pytest.raises(OSError):  # the same port on another interface: nobody listens
        socket.create_connection((address, server.port), timeout=5).close()


def _outward_address() -> str | None:
    """This machine's address on its default network interface (a UDP socket "connected" to
    a private address sends nothing but picks the interface), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.254.254.254", 1))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") or address == "0.0.0.0" else address


def test_client_gets_the_cli_pixels_and_bad_values_do_not_stop_the_server(server, run, tmp_path):
    from gradio_client.exceptions import AppError

    client = _client(server.url)
    grid, *_ = _request(client, steps=3, seed=4, n=3)
    cli = _cli_pixels(run, tmp_path, sampler="ddim", steps=3, seed=4, n=3)
    assert np.array_equal(np.asarray(Image.open(grid)), _grid_of(load_run(run), cli))
    # gradio's checks of the slider and dropdown bounds answer first, check_request after
    refused = [
        ({"steps": 0}, "minimum value 1|at least 1"),
        ({"steps": 10**6}, "maximum value 250|at most 250"),
        ({"n": 10**6}, "maximum value 8|at most 8"),
        ({"sampler": "nope"}, "nope"),
        ({"eta": -1.0}, "eta must be >= 0"),  # check_request's own message
    ]
    for change, message in refused:
        with pytest.raises(AppError, match=message):
            _request(client, **change)
    assert Path(_request(client, steps=2, n=1)[0]).is_file()  # still serving


def _can_browse() -> bool:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return False
    return CHROMIUM is not None and CHROMEDRIVER is not None


def _browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    if CHROMIUM is None or CHROMEDRIVER is None:
        pytest.skip("needs Debian's chromium and chromium-driver (apt-get install chromium "
                    "chromium-driver)")  # fmt: skip
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1280,900",
                 f"--user-data-dir={tempfile.mkdtemp()}"):  # fmt: skip
        opts.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)


def _type(driver, selector: str, value: int) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.CSS_SELECTOR, selector)
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(value), Keys.TAB)


def _shown_image(driver, wait, element: str, old: str | None = None) -> tuple[str, np.ndarray]:
    """The src of the picture in #element (a new one when ``old``) and its pixels."""
    from selenium.webdriver.common.by import By

    def src(d):
        imgs = d.find_elements(By.CSS_SELECTOR, f"#{element} img")
        s = imgs[0].get_attribute("src") if imgs else None
        return s if s and s != old else None

    url = wait.until(src)
    with urllib.request.urlopen(url, timeout=30) as f:
        return url, np.asarray(Image.open(BytesIO(f.read())))


def drive_page(url: str, *, steps: int, seed: int, n: int, screenshot: Path | None = None):
    """Open the page, set steps, seed and the number of images, press Sample, move the step
    slider to the first step; returns (grid pixels, captions seen, x_t pictures seen)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = _browser()
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 120)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#sample"))
        _type(driver, "#steps input[type=number]", steps)
        _type(driver, "#seed input[type=number]", seed)
        _type(driver, "#n input[type=number]", n)
        driver.find_element(By.CSS_SELECTOR, "#sample").click()
        _, grid = _shown_image(driver, wait, "samples")
        caption = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#caption").text)
        last_src, last_xt = _shown_image(driver, wait, "xt")
        _type(driver, "#step input[type=number]", 0)  # the slider to the first step
        wait.until(lambda d: "step 1/" in d.find_element(By.CSS_SELECTOR, "#caption").text)
        _, first_xt = _shown_image(driver, wait, "xt", old=last_src)
        first = driver.find_element(By.CSS_SELECTOR, "#caption").text
        if screenshot is not None:
            driver.save_screenshot(str(screenshot))
        return grid, [caption, first], [last_xt, first_xt]
    finally:
        driver.quit()


def test_a_browser_samples_and_scrubs_through_the_steps(server, run, tmp_path):
    shot = os.environ.get("DIFFLAB_DEMO_SCREENSHOT")  # where to keep the README's picture
    grid, captions, xts = drive_page(server.url, steps=4, seed=7, n=4,
                                     screenshot=Path(shot) if shot else None)  # fmt: skip
    cli = _cli_pixels(run, tmp_path, sampler="ddim", steps=4, seed=7, n=4)
    assert np.array_equal(grid, _grid_of(load_run(run), cli))
    assert captions[0].startswith("step 4/4") and captions[1].startswith("step 1/4")
    assert xts[0].shape == xts[1].shape and not np.array_equal(xts[0], xts[1])


def test_the_exported_folder_runs_its_own_demo(run, tmp_path):
    """``difflab export`` writes app.py and requirements.txt; ``python app.py`` in the folder
    serves the same page on the diffusers weights: the client and the browser get the pixels
    of ``difflab sample`` on the folder."""
    pytest.importorskip("gradio")
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    assert (out / "requirements.txt").read_text() == "difflab[demo]\n"
    front = (out / "README.md").read_text().split("---")[1].splitlines()  # the Space settings
    assert "sdk: gradio" in front and "app_file: app.py" in front
    server = Server(["app.py"], cwd=out)
    try:
        assert f"http://127.0.0.1:{server.port}" in server.text()
        folder = load_run(out)
        sampler = folder.cfg.sample.sampler  # the page's first choice
        grid, *_ = _request(_client(server.url), sampler=sampler, steps=3, seed=2, n=2)
        cli = _cli_pixels(out, tmp_path, sampler=sampler, steps=3, seed=2, n=2)
        expected = _grid_of(folder, cli)
        assert np.array_equal(np.asarray(Image.open(grid)), expected)
        if _can_browse():  # and in the browser
            shown, captions, _ = drive_page(server.url, steps=3, seed=2, n=2)
            assert np.array_equal(shown, expected) and captions[0].startswith("step 3/3")
    finally:
        server.stop()
