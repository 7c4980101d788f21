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
