"""Every tutorial runs in fast mode, writes its figures and checks the claims it makes.

The tutorials (``tutorials/[0-9]*.py``, found by glob so new ones are picked up) assert their
own claims; each one leaves a module-level ``RESULTS: dict[str, float]`` with the checked
numbers, and the key ones are re-checked here against the same oracles' tolerances. The
answers to each tutorial's "Try this" exercises run too (``DIFFLAB_ANSWERS=1``) and leave
``answer_*`` keys. Each tutorial is executed as a notebook (jupytext + nbclient, the way a
student runs it), and its ``RESULTS`` are read back from the kernel.
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TUTORIAL_DIR = ROOT / "tutorials"
TUTORIALS = sorted(TUTORIAL_DIR.glob("[0-9]*.py"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _z(limit: float = 4.0) -> Callable[[float], bool]:
    """A Monte Carlo z-score within ``limit`` standard errors."""
    return lambda v: abs(v) < limit


def _below(limit: float) -> Callable[[float], bool]:
    return lambda v: abs(v) < limit


# tutorial number -> {RESULTS key: check}
KEY_CHECKS: dict[str, dict[str, Callable[[float], bool]]] = {
    "01": {
        "uniform_sq_mean_z": _z(),
        "uniform_sq_var_z": _z(),
        "covariance_max_abs_z": _z(),
        "conditional_mean_max_abs_z": _z(),
        "conditional_var_max_abs_z": _z(),
        "convolution_max_abs_err": _below(1e-8),
        "std_added_max_abs_err": lambda v: v > 1e-2,
        "one_step_variance_identity_max_err": _below(1e-12),
    },
    "02": {
        "reparam_grad_mu_z": _z(),
        "reparam_grad_s_z": _z(),
        "kl_library_vs_formula_max_abs": _below(1e-12),
        "kl_monte_carlo_max_abs_z": _z(),
        "kl_diagonal_5d_z": _z(),
        "elbo_gap_minus_kl_max_abs": _below(1e-12),
        "elbo_max_over_grid_minus_log_px": lambda v: v <= 1e-12,
        "elbo_at_posterior_minus_log_px": _below(1e-12),
        "elbo_mc_z": _z(),
        "fit_mean_error": _below(0.05),
    },
    "03": {
        "image_chain_mean_max_abs_z": _z(),
        "image_chain_var_max_abs_z": _z(),
        "slip_std_as_variance_max_abs_z": lambda v: v > 20,
        "toy_chain_residual_max_abs_z": _z(4.5),
        "toy_closed_vs_chain_var_max_abs_z": _z(),
        "cosine_vs_eq17_max_abs": _below(1e-12),
        "t_half_linear": lambda v: 200 < v < 300,
    },
    "04": {
        "posterior_mean_err_in_sd": _below(1e-6),
        "posterior_var_rel_err": _below(1e-6),
        "ideal_bound_minus_nll_max_abs": _below(1e-9),
        "gap_small_nats": lambda v: v > 0,
        "gap_large_nats": lambda v: v > 0,
        "vlb_monte_carlo_z": _z(),
        "lsimple_identity_small_max_rel_err": _below(1e-9),
        "lsimple_identity_large_max_rel_err": _below(1e-9),
        "mu_eps_form_vs_posterior_max_abs": _below(1e-10),
        "answer_unit_data_ideal_is_beta_max_rel": _below(1e-9),
    },
    "06": {
        "alg2_vs_difflab_small_max_abs": _below(1e-9),
        "x0_err_over_eps_err_at_T_rel": _below(1e-4),
        "clipped_max_abs_pixel": lambda v: v <= 1 + 1e-6,
        "unclipped_max_abs_pixel": lambda v: v > 1.5,
    },
    "08": {
        "ddim_by_hand_eta0_max_abs": _below(1e-10),
        "ddim_by_hand_eta1_max_abs": _below(1e-10),
        "q_c_marginal_mean_max_abs_z": _z(),
        "q_c_marginal_var_max_abs_z": _z(),
        "q_c_eta1_vs_posterior_max_abs": _below(1e-12),
        "answer_ddim_eta_half_max_abs": _below(1e-10),
    },
    "10": {
        "vlb_learned_gap_z": _z(),
        "answer_large_variance_tight_z": _z(),
        "hybrid_logvar_err_after": lambda v: v < 0.5,
    },
    "11": {
        "add_noise_vs_q_sample_max_abs": _below(1e-5),
        "add_noise_vs_q_sample_at_k_max_abs": lambda v: v > 1e-2,
        "ddim_loop_diffusers_vs_difflab_max_abs": _below(1e-6),
        "unet_forward_max_abs": _below(1e-4),
        "unet_forward_at_k_max_abs": lambda v: v > 1e-2,
        "train_step_loss_rel": _below(1e-5),
        "sd_ddim_vs_difflab_grid_max_abs": _below(1e-6),
        "ddim_gap_max_when_n_divides": _below(1e-6),
        "ddim_gap_min_otherwise": lambda v: v > 1e-4,
        "pred_original_sample_max_abs": _below(1e-4),
        "euler_vs_diffusers_max_abs": _below(1e-4),
        "dpmpp2m_vs_diffusers_max_abs": _below(1e-4),
        "latent_scale_times_std_minus_1": _below(1e-6),
        "latents_decoded_max_abs": _below(1e-5),
        "answer_sd_trailing_vs_difflab_max_abs": _below(1e-6),
    },
    "12": {
        "pixels_over_latents": lambda v: v > 1,
        "flops_ratio_over_f2": lambda v: 0.7 < v < 1.3,
        "ae_loss_vs_by_hand_rel": _below(1e-5),
        "kl_closed_form_vs_by_hand_rel": _below(1e-5),
        "kl_monte_carlo_max_abs_z": _z(),
        "psnr_vs_formula_max_abs": _below(1e-9),
        "latent_std_after": lambda v: abs(v - 1) < 0.15,
        "scale_vs_pooled_std_rel": _below(1e-6),
        "latent_sample_vs_decode_max_abs": _below(1e-6),
        "posterior_std_over_spread": _below(0.2),
        "amplification_at_T_ldm_uncond": lambda v: 80 < v < 90,
        "answer_var_zt_z": _z(),
    },
    "13": {
        "downsample_vs_block_mean_max_abs": _below(1e-6),
        "aug_mean_max_abs_z_s50": _z(5),
        "aug_var_max_abs_z_s50": _z(5),
        "aug_mean_max_abs_z_s300": _z(5),
        "aug_var_max_abs_z_s300": _z(5),
        "aug_kl_vs_closed_form_max_rel": _below(1e-9),
        "aug_pooled_var_z_s50": _z(5),
        "aug_pooled_var_z_slip_s50": lambda v: v > 10,
        "cascade_vs_by_hand_max_abs": _below(1e-12),
        "answer_alpha_minus_sigma": _below(1e-9),
    },
    "14": {
        "x0_eps_from_u_max_abs": _below(1e-12),
        "flow_euler_vs_ddim_max_abs": _below(1e-12),
        "loss_flow_vs_eps_max_rel": _below(1e-9),
        "loss_flow_vs_x0_max_rel": _below(1e-9),
        "dpmpp_flow_vs_vp_max_abs": _below(1e-8),
        "straightness_point_flow": lambda v: v > 0.999,
        "straightness_unit_gaussian_vp": lambda v: v > 0.999,
        "shift_logsnr_max_abs": _below(1e-9),
        "torchcfm_flip_max_abs": _below(1e-12),
        "answer_ddim_flow_vs_vp_max_abs": _below(1e-8),
    },
    "15": {
        "target_plug_back_max_err": _below(1e-10),
        "pd_1_step_vs_8_step_rms": _below(0.02),
        "teacher_1_step_vs_8_step_rms": lambda v: v > 0.2,
        "consistency_1_step_cov_z": _z(),
        "cd_err_at_t_max": _below(0.15),
        "sw_ddim_2": lambda v: v > 0.3,
    },
    "16": {
        "score_tweedie_vs_autograd_max_rel": _below(1e-9),
        "sde_forward_mean_max_abs_z": _z(),
        "sde_forward_var_max_abs_z": _z(),
        "reverse_sde_nll_z": _z(),
        "pf_ode_nll_z": _z(),
        "pf_ode_gauss_error_ratio": lambda v: 1.5 < v < 3,
        "edm_unit_variance_max_abs_z": _z(),
        "edm_lambda_c_out_sq_max_err": _below(1e-12),
        "v_as_edm_max_abs": _below(1e-12),
        "answer_eps_as_edm_max_abs": _below(1e-12),
    },
    "17": {
        "inversion_gauss_min_ratio": lambda v: v > 1.5,
        "inversion_gauss_max_ratio": lambda v: v < 3,
    },
    "18": {
        "patchify_roundtrip_max_abs": lambda v: v == 0,
        "patch_token_max_abs": lambda v: v == 0,
        "pos_embed_closed_form_max_abs": _below(1e-6),
        "pos_embed_offset_identity_max_abs": _below(1e-5),
        "attention_vs_hand_max_abs": _below(1e-12),
        "block_identity_max_abs": lambda v: v == 0,
        "dit_output_at_init_max_abs": lambda v: v == 0,
        "grad_attention_norm": lambda v: v == 0,
        "grad_modulation_norm": lambda v: v > 0,
        "open_gates_vs_hand_max_abs": _below(1e-6),
        "dit_held_out_ratio": _below(0.7),
        "unet_held_out_ratio": _below(0.7),
        "answer_uvit_extra_params": lambda v: v > 0,
    },
}
MIN_ANSWERS = 2  # "Try this" exercises whose answers each tutorial checks
# tutorial number -> the optional package it compares with (installed by the dev extra)
NEEDS = {"11": "diffusers"}


def test_full_mode_digits_are_random_draws_of_mnist(tmp_path, monkeypatch):
    """``_common.load_digits`` on an MNIST folder: every training image once, in an order set by
    the generator, and ``n_val`` distinct test images drawn at random, not the files' first
    (MNIST's files are ordered by writer group). The fake files number their images by the
    first pixel."""
    import gzip
    import struct

    import numpy as np
    import torch

    folder = tmp_path / "mnist"
    folder.mkdir()
    for prefix, n in (("train", 200), ("t10k", 100)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = np.arange(n)
        for kind, arr in (("images-idx3", images), ("labels-idx1", np.arange(n) % 10)):
            header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim)
            header += struct.pack(f">{arr.ndim}I", *arr.shape)
            blob = gzip.compress(header + arr.astype(np.uint8).tobytes(), mtime=0)
            (folder / f"{prefix}-{kind}-ubyte.gz").write_bytes(blob)
    monkeypatch.delenv("DIFFLAB_FAST", raising=False)
    monkeypatch.setenv("DIFFLAB_DATA_DIR", str(tmp_path))
    monkeypatch.syspath_prepend(str(TUTORIAL_DIR))
    import _common

    def index(x: torch.Tensor) -> list[int]:  # [-1, 1] back to the byte in the first pixel
        return [round(v) for v in ((x[:, 0, 0, 0] + 1) * 127.5).tolist()]

    train, val, source = _common.load_digits(30, generator=torch.Generator().manual_seed(0))
    assert source == "MNIST" and train.shape == (200, 1, 28, 28) and val.shape == (30, 1, 28, 28)
    assert sorted(index(train)) == list(range(200)) and index(train) != list(range(200))
    assert len(set(index(val))) == 30 and index(val) != list(range(30))
    again = _common.load_digits(30, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0], train) and torch.equal(again[1], val)


def test_tutorials_are_found():
    assert [p.name[:2] for p in TUTORIALS[:4]] == ["01", "02", "03", "04"]


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_is_a_percent_notebook_listed_in_the_readme(path: Path):
    text = path.read_text(encoding="utf-8")
    assert re.search(r"^# %% \[markdown\]\n# # \d+\. ", text, re.MULTILINE), (
        f"{path.name} must open with a markdown cell whose first line is '# # N. Title'"
    )
    assert re.search(r"^# %%$", text, re.MULTILINE), f"{path.name} has no code cell"
    # ends with a summary for a reader and exercises, not a dump of RESULTS
    assert "\n# ## Summary\n" in text and "\n# ## Try this\n" in text, path.name
    assert "for key, value in RESULTS.items()" not in text, f"{path.name} prints RESULTS"
    readme = (TUTORIAL_DIR / "README.md").read_text(encoding="utf-8")
    assert path.name in readme, f"tutorials/README.md does not list {path.name}"


def _private_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A Jupyter kernelspec that runs ipykernel on this interpreter, in a private JUPYTER_PATH.

    Nothing is looked up outside the test's folder (no network, no user kernels), so the same
    kernel is used in a fresh CI virtual environment and on a developer's machine.
    """
    name = "difflab-tests"
    spec_dir = tmp_path / "jupyter" / "kernels" / name
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "difflab tests",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    # the kernel runs in tutorials/, so a relative PYTHONPATH entry (PYTHONPATH=src) is made
    # absolute; an installed difflab needs nothing
    entries = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(str(Path(e).resolve()) for e in entries))
    return name


RESULTS_MARK = "__difflab_results__"
# appended to each notebook: the kernel's RESULTS, for the checks below
RESULTS_CELL = f"import json as _j\nprint({RESULTS_MARK!r} + _j.dumps(RESULTS))"


def _failure(path: Path, nb, err: Exception) -> str:
    """One readable paragraph for a cell that raised: the tutorial, the line in the .py file,
    the exception and the last lines of its traceback (ANSI colours removed)."""
    text = path.read_text(encoding="utf-8")
    failed = [
        cell
        for cell in nb.cells
        if cell.cell_type == "code" and any(o.output_type == "error" for o in cell.outputs)
    ]
    if not failed:  # a timeout, or a dead kernel
        return f"{path.name}: {type(err).__name__}: {str(err)[-2000:]}"
    error = next(o for o in failed[0].outputs if o.output_type == "error")
    trace = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(error.traceback))
    offset = text.find(failed[0].source)
    first = text.count("\n", 0, offset) + 1  # the cell's first line in the .py file
    in_cell = re.findall(r"Cell In\[\d+\], line (\d+)", trace)
    where = f"line {first + int(in_cell[0]) - 1}" if in_cell and offset >= 0 else "a cell"
    tail = "\n".join(trace.strip().splitlines()[-12:])
    return f"{path.name}, {where}: {error.ename}: {error.evalue}\n{tail}"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_tutorial_runs_as_a_notebook_in_fast_mode(
    path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The tutorial executed as a notebook (jupytext + nbclient), as a student runs it in
    Jupyter (working directory tutorials/), in fast mode with the answers to its exercises:
    every cell runs (so every ``assert`` in it holds), every saved figure is shown inline, no
    cell echoes a value, and the kernel's ``RESULTS`` pass ``KEY_CHECKS``."""
    import base64

    import jupytext
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, CellTimeoutError

    if path.name[:2] in NEEDS:
        pytest.importorskip(NEEDS[path.name[:2]])
    out = tmp_path / "figures"
    monkeypatch.setenv("DIFFLAB_FAST", "1")
    monkeypatch.setenv("DIFFLAB_ANSWERS", "1")  # also run the answers to the exercises
    monkeypatch.setenv("DIFFLAB_TUTORIAL_OUT", str(out))
    monkeypatch.delenv("DIFFLAB_DATA_DIR", raising=False)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's own default
    kernel = _private_kernel(tmp_path, monkeypatch)
    before = _tutorial_files()
    nb = jupytext.read(path)
    nb.cells.append(nbformat.v4.new_code_cell(RESULTS_CELL))
    client = NotebookClient(
        nb,
        kernel_name=kernel,
        timeout=600,  # per cell
        resources={"metadata": {"path": str(TUTORIAL_DIR)}},  # as Jupyter: cwd = tutorials/
    )
    failure = None
    try:
        client.execute()
    except (CellExecutionError, CellTimeoutError) as err:
        failure = _failure(path, nb, err)
    if failure is not None:  # outside the except block: no chained traceback
        pytest.fail(failure, pytrace=False)
    assert _tutorial_files() == before, f"{path.name} wrote into tutorials/ (use out_path)"

    *cells, last = [cell for cell in nb.cells if cell.cell_type == "code"]
    printed = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    assert printed.startswith(RESULTS_MARK), printed[-2000:]
    results = json.loads(printed[len(RESULTS_MARK) :])
    assert isinstance(results, dict) and results, "a tutorial must leave a non-empty RESULTS"
    for key, value in results.items():
        assert isinstance(key, str) and isinstance(value, float), (key, value)
        assert math.isfinite(value), f"RESULTS[{key!r}] = {value}"
    answers = [key for key in results if key.startswith("answer_")]
    assert len(answers) >= MIN_ANSWERS, f"{path.name}: answers checked: {answers}"
    for key, check in KEY_CHECKS.get(path.name[:2], {}).items():
        assert key in results, f"{path.name}: RESULTS lacks {key!r}"
        assert check(results[key]), f"{path.name}: RESULTS[{key!r}] = {results[key]}"

    # every figure written is shown inline, as the PNG that was saved
    outputs = [o for cell in cells for o in cell.outputs]
    figures = sorted(out.glob("*.png"))
    assert figures, f"{path.name} wrote no PNG into DIFFLAB_TUTORIAL_OUT"
    for fig in figures:
        assert fig.read_bytes()[:8] == PNG_MAGIC and fig.stat().st_size > 2000, fig
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    n_saved = sum(
        o.get("text", "").count("wrote ") for o in outputs if o.output_type == "stream"
    )  # _common.save prints "wrote PATH" and then shows it
    assert len(images) == n_saved >= len(figures), (len(images), n_saved, len(figures))
    for o in images:
        assert base64.b64decode(o["data"]["image/png"])[:8] == PNG_MAGIC
    # no "Out: PosixPath(...)" after a save, no "<Figure size ...>" text instead of a figure
    texts = [o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for o in outputs]
    assert not [o for o in outputs if o.output_type == "execute_result"], "stray Out: line"
    assert not [t for t in texts if "<Figure" in t], "a figure shown as text"


def _tutorial_files() -> set[str]:
    """The files under tutorials/, but for caches and the default figure folder."""
    return {
        str(p.relative_to(TUTORIAL_DIR))
        for p in TUTORIAL_DIR.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and "_out" not in p.parts
    }


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda p: p.stem)
def test_no_code_cell_ends_in_a_value_a_notebook_would_echo(path: Path):
    """A cell whose last statement is an expression shows an ``Out:`` line in a notebook
    (``torch.manual_seed(0)`` echoes a Generator, ``ax.set(...)`` a list); only ``print(...)``
    ``save(...)`` and ``grid_panels(...)``, which return None, may end a cell."""
    import jupytext

    for index, cell in enumerate(jupytext.read(path).cells):
        if cell.cell_type != "code":
            continue
        body = ast.parse(cell.source).body
        if body and isinstance(body[-1], ast.Expr):
            call = body[-1].value
            name = getattr(getattr(call, "func", None), "id", None)
            assert name in ("print", "save", "grid_panels"), (
                f"{path.name}, cell {index}: ends in a value"
            )
