"""The code's shape: every "what kind of thing is this" question has one table.

Kinds of run are answered by ``difflab.app.kinds.KINDS`` and samplers by the sampler table in
``difflab.samplers``: outside those modules no code compares a config's model kind, image task
or sampler with a name. The check is textual (a regular expression over the source), so it also
catches a branch hidden in a helper.
"""

from __future__ import annotations

import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "difflab"

# `x.kind == "..."`, `model.kind in (...)`, `image_task != "none"`, `kind.name == ...`
KIND_BRANCH = re.compile(r"(\.kind|image_task|kind\.name)\s*(==|!=|\bin\b|\bnot in\b)")
# a sampler name compared with a literal: `sampler == "ddim"`, `name in ("heun", ...)`
SAMPLER_BRANCH = re.compile(
    r"""(sampler|name)\s*(==|!=|\bin\b|\bnot in\b)\s*[("']*\s*"""
    r"""["'](ddpm|ddim|dpm\+\+|euler|heun|ipndm)"""
)


def _lines(exclude: tuple[str, ...]) -> list[tuple[str, int, str]]:
    out = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(exclude):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("#", 1)[0]
            out.append((rel, i, code))
    return out


def test_no_branch_on_run_kinds_outside_the_kind_table():
    hits = [
        f"{f}:{i}: {c.strip()}" for f, i, c in _lines(("app/kinds.py",)) if KIND_BRANCH.search(c)
    ]
    assert not hits, "branches on kinds of run outside app/kinds.py:\n" + "\n".join(hits)


def test_no_branch_on_sampler_names_outside_the_samplers():
    hits = [
        f"{f}:{i}: {c.strip()}" for f, i, c in _lines(("samplers/",)) if SAMPLER_BRANCH.search(c)
    ]
    assert not hits, "branches on sampler names outside difflab/samplers:\n" + "\n".join(hits)


def test_the_checks_find_what_they_look_for():
    """The patterns match the branches they exist to forbid (so the tests above can fail)."""
    assert KIND_BRANCH.search('if cfg.model.kind == "classifier":')
    assert KIND_BRANCH.search('if cfg.model.image_task != "none":')
    assert KIND_BRANCH.search("if built.kind.name in ('a', 'b'):")
    assert not KIND_BRANCH.search("if built.kind.has_denoiser:")
    assert SAMPLER_BRANCH.search('if sampler == "ddim":')
    assert SAMPLER_BRANCH.search('if name in ("heun", "dpm++2s"):')
    assert not SAMPLER_BRANCH.search("if sampler == built.cfg.sample.sampler:")


def test_every_kind_is_selected_by_its_model_kind_and_the_error_lists_them():
    """Each preset selects the kind of its ``model.kind`` (and image task), and an unknown
    ``model.kind`` is refused with the list read off the table."""
    import pytest

    from difflab.app.config import PRESETS, apply_overrides
    from difflab.app.kinds import KINDS, kind_of

    seen = set()
    for cfg in PRESETS.values():
        kind = kind_of(cfg)
        assert kind.model_kind == cfg.model.kind, cfg.preset
        assert kind.conditions_on_images == (cfg.model.image_task != "none"), cfg.preset
        seen.add(kind.name)
    assert seen == set(KINDS), "a kind of run without a preset"
    with pytest.raises(ValueError, match="unknown model.kind 'gan'; choose one of: ") as err:
        kind_of(apply_overrides(PRESETS["mnist"], ["model.kind=gan"]))
    assert all(k.model_kind in str(err.value) for k in KINDS.values())


# building a network by its class or preset table: only the network table does
NETWORK_BUILD = re.compile(r"\b(build_unet|UNET_PRESETS|build_autoencoder|AUTOENCODER_PRESETS)\b")
# the modules that are networks (nn/; classifier.py is the U-Net's encoder), convert them
# (interop/), the public lazy re-exports (__init__.py) and the latent-space library pieces
NETWORK_MODULES = ("nn/", "interop/", "classifier.py", "__init__.py", "latent.py")


def test_networks_are_built_only_through_the_network_table():
    hits = [
        f"{f}:{i}: {c.strip()}" for f, i, c in _lines(NETWORK_MODULES) if NETWORK_BUILD.search(c)
    ]
    assert not hits, "networks built outside difflab.nn.networks:\n" + "\n".join(hits)
    assert NETWORK_BUILD.search("net = build_unet(m.preset, **kw)")
    assert NETWORK_BUILD.search("check_choice('model.preset', p, tuple(UNET_PRESETS))")


def _pairs():
    """Every (kind of run, network) pair the tables allow: the network builds the head the kind
    needs, on the kind's data."""
    from difflab.app.kinds import KINDS
    from difflab.nn.networks import NETWORKS

    return [(k, n) for k in KINDS for n, net in NETWORKS.items()
            if KINDS[k].head in net.heads and KINDS[k].data == net.data]  # fmt: skip


def _tiny_built(kind: str, net: str):
    """A run of ``kind`` (its first preset) with network ``net`` at its smallest preset."""
    from difflab.app.config import PRESETS, apply_overrides
    from difflab.app.kinds import kind_of
    from difflab.app.runs import build
    from difflab.nn.networks import NETWORKS

    preset = next(p for p in PRESETS.values() if kind_of(p).name == kind)
    presets = list(NETWORKS[net].presets)
    sets = [f"model.net={net}", "model.ae_preset=tiny", "model.hidden=8",
            "train.device=cpu", "diffusion.T=20", "distill.teacher_steps=4"]  # fmt: skip
    if presets and kind != "autoencoder":  # the autoencoder's preset is model.ae_preset
        sets.append(f"model.preset={'tiny' if 'tiny' in presets else presets[0]}")
    if not preset.data.is_toy:
        sets.append("data.image_size=16")
    if kind == "latent-diffusion":
        sets.append("model.latent_scale=1.0")  # as a trained latent run
    return build(apply_overrides(preset, sets), load_data=False)


def _loss_step(built):
    import torch

    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(4, *built.data_shape, generator=g) * 2 - 1
    loss, _ = built.kind.loss_fn(built, {})((x0, torch.arange(4) % 2), g)
    return loss


def test_every_allowed_task_and_network_pair_takes_a_loss_step():
    """Each kind's first preset, with each network it allows at that network's smallest
    preset, builds and takes one optimisation step on random data."""
    import torch

    pairs = _pairs()
    assert {k for k, _ in pairs} >= {"diffusion-2d", "diffusion-image", "classifier",
                                     "autoencoder", "latent-diffusion", "super-resolution",
                                     "image-to-image", "sohl-dickstein"}  # fmt: skip
    for kind, net in pairs:
        loss = _loss_step(_tiny_built(kind, net))
        loss.backward()
        assert torch.isfinite(loss), (kind, net)


def test_every_denoising_task_trains_with_its_process_loss(monkeypatch):
    """The loss of every task with a denoiser is its process's (``Process.loss``), given what
    the task diffuses: the latents for a latent run, the images with their low-resolution or
    degraded conditioning for SR and image-to-image runs. A task that called a loss of its own
    (latent and SR runs called ``diffusion_loss`` through their own objectives) would train
    on the DDPM loss whatever process the config chose, and fails here."""
    import dataclasses

    import difflab.app.kinds as kinds
    from difflab.process_table import process_for

    seen = []

    def recording(denoiser, x, **options):
        seen.append((tuple(x.shape[1:]), options["cond"]))
        return process_for("linear").loss(denoiser, x, **options)

    monkeypatch.setattr(
        kinds, "process_for", lambda name: dataclasses.replace(process_for(name), loss=recording)
    )
    expected = {"latent-diffusion": "latents", "super-resolution": "image",
                "image-to-image": "image"}  # fmt: skip
    for kind in ("diffusion-2d", "diffusion-image", *expected):
        seen.clear()
        built = _tiny_built(kind, "mlp" if kind == "diffusion-2d" else "unet")
        _loss_step(built)
        assert len(seen) == 1, kind
        shape, cond = seen[0]
        if expected.get(kind) == "latents":
            assert shape == tuple(built.model.ae.latent_shape()), kind
        else:
            assert shape == tuple(built.data_shape), kind
        assert (expected.get(kind) == "image") == (isinstance(cond, dict) and "image" in cond)
