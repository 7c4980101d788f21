"""difflab's DiT against diffusers' DiTTransformer2DModel as the oracle: same weights, same
output to 1e-5 of its scale (float32, tiny random models, CPU).

Why relative to the scale: both networks compute their sinusoidal time features in float32 with
frequencies rounded differently, and difflab's are taken at t = k + 1 while diffusers' at k,
with the shift folded into the weights in float64. At t near 1000 the features differ by about
1e-7 * t * w in angle, which the network multiplies by its gain: ~5e-6 on outputs of size 2.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from difflab.interop.diffusers_dit import (  # noqa: E402
    diffusers_config_from_dit,
    dit_config_from_diffusers,
    dit_state_dict_from_diffusers,
    dit_state_dict_to_diffusers,
    load_diffusers_dit,
    save_diffusers_dit,
)
from difflab.nn.dit import DiT, build_dit, pos_embed_2d  # noqa: E402
from helpers import randomise  # noqa: E402

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_thread")]

# tiny DiTTransformer2DModel configs: learned sigma (out = 2 in) or not, patch 1 and 2, 1 or 3
# heads, diffusers' default norm_eps (1e-5) and DiT's 1e-6, no attention bias
TINY = {
    "learned-sigma": dict(
        num_attention_heads=2, attention_head_dim=8, in_channels=2, out_channels=4,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=5,
    ),
    "patch1-3heads": dict(
        num_attention_heads=3, attention_head_dim=4, in_channels=3, num_layers=3,
        sample_size=5, patch_size=1, num_embeds_ada_norm=2, norm_eps=1e-6,
    ),
    "no-attention-bias": dict(
        num_attention_heads=1, attention_head_dim=8, in_channels=1, num_layers=1,
        sample_size=4, patch_size=2, num_embeds_ada_norm=3, attention_bias=False,
    ),
}  # fmt: skip


def _random_diffusers(config: dict, seed: int = 0):
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**config)
    return randomise(model, seed=seed, std=0.15).eval()


def _share_embeddings(model) -> None:
    """Copy block 0's conditioning embedders into every block (what DiT checkpoints hold)."""
    first = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first)


def _theirs(model, x, t, labels) -> torch.Tensor:
    with torch.no_grad():
        return model(x, timestep=t - 1, class_labels=labels).sample  # k = t - 1


@pytest.mark.parametrize("name", list(TINY))
def test_converted_diffusers_dit_gives_the_same_output(name: str) -> None:
    config = TINY[name]
    theirs = _random_diffusers(config)
    _share_embeddings(theirs)
    cfg = dit_config_from_diffusers(dict(theirs.config))
    ours = DiT(**dataclasses.asdict(cfg))
    ours.load_state_dict(dit_state_dict_from_diffusers(theirs.state_dict(), cfg))
    ours.eval()
    gen = torch.Generator().manual_seed(1)
    size, c = config["sample_size"], config["in_channels"]
    x = torch.randn(4, c, size, size, generator=gen)
    t = torch.tensor([1.0, 17.0, 250.5, 1000.0])  # difflab time; fractional works too
    classes = config["num_embeds_ada_norm"]
    labels = torch.tensor([0, classes - 1, classes, 1])  # `classes` = the null label
    with torch.no_grad():
        out = ours(x, t, labels)
    scale = out.abs().max().item()
    torch.testing.assert_close(out, _theirs(theirs, x, t, labels), rtol=1e-5, atol=1e-5 * scale)
    # and back: difflab -> diffusers reproduces every diffusers tensor (up to the float64
    # round trip of the time layer)
    back = dit_state_dict_to_diffusers(ours.state_dict(), cfg)
    want = theirs.state_dict()
    if not config.get("attention_bias", True):
        want = {**want, **{k: torch.zeros_like(v) for k, v in back.items() if "to_q.bias" in k}}
        want |= {
            k: torch.zeros_like(v)
            for k, v in back.items()
            if k.endswith(("to_k.bias", "to_v.bias"))
        }
    assert set(back) == set(want)
    for key, value in want.items():
        torch.testing.assert_close(back[key], value, rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("num_classes", [0, 4])
def test_exported_dit_loads_in_diffusers_and_back(tmp_path, num_classes: int) -> None:
    """save_diffusers_dit -> DiTTransformer2DModel.from_pretrained gives the same output;
    load_diffusers_dit reads the folder back to the same weights. An unconditional model is
    written with an all-zero class table, so every label gives the unconditional output."""
    ours = randomise(
        build_dit(
            "tiny", in_channels=2, out_channels=4, num_classes=num_classes, time_features=256
        ),
        seed=3,
        std=0.1,
    ).eval()
    folder = save_diffusers_dit(ours, tmp_path / "dit")
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(folder).eval()
    gen = torch.Generator().manual_seed(2)
    x, t = torch.randn(3, 2, 8, 8, generator=gen), torch.tensor([1.0, 40.0, 999.0])
    labels = torch.tensor([0, 3, 4]) if num_classes else torch.tensor([0, 1, 1])
    with torch.no_grad():
        out = ours(x, t, labels if num_classes else None)
    scale = out.abs().max().item()
    torch.testing.assert_close(_theirs(theirs, x, t, labels), out, rtol=1e-5, atol=1e-5 * scale)
    back = load_diffusers_dit(folder)
    assert back.config == ours.config
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(back.state_dict()[key], value, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="not empty"):
        save_diffusers_dit(ours, folder)
    save_diffusers_dit(ours, folder, overwrite=True)


def test_position_embeddings_equal_diffusers() -> None:
    """A second oracle for the closed form: diffusers' own 2-D sin-cos table."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    theirs = get_2d_sincos_pos_embed(24, 5, base_size=5, output_type="pt")
    torch.testing.assert_close(pos_embed_2d(24, 5, 5), theirs.float(), rtol=0, atol=1e-6)


def test_what_does_not_map_is_one_line() -> None:
    base = dict(TINY["learned-sigma"])
    bad_configs = [
        ({**base, "activation_fn": "geglu"}, "activation_fn"),
        ({**base, "norm_type": "ada_norm"}, "norm_type"),
        ({**base, "norm_elementwise_affine": True}, "norm_elementwise_affine"),
        ({**base, "sample_size": [8, 4]}, "square"),
        ({**base, "cross_attention_dim": 8}, "does not know"),
        ({**base, "_class_name": "PixArtTransformer2DModel"}, "not supported"),
        ({**base, "attention_head_dim": 3, "num_attention_heads": 2}, "invalid difflab DiT"),
    ]
    for config, match in bad_configs:
        with pytest.raises(ValueError, match=match) as err:
            dit_config_from_diffusers(config)
        assert "\n" not in str(err.value)
    tiny = build_dit("tiny", time_features=256).config
    for change, match in [
        (dict(long_skips=True), "long_skips"),
        (dict(aug_level_embedding=True), "aug_level_embedding"),
        (dict(time_features=32), "time_features"),
        (dict(mlp_ratio=2), "mlp_ratio"),
    ]:
        with pytest.raises(ValueError, match=match):
            diffusers_config_from_dit(dataclasses.replace(tiny, **change))
    # blocks with different conditioning embedders do not fit one difflab embedding
    theirs = _random_diffusers(base)
    cfg = dit_config_from_diffusers(dict(theirs.config))
    with pytest.raises(ValueError, match="differs from block 0"):
        dit_state_dict_from_diffusers(theirs.state_dict(), cfg)
    _share_embeddings(theirs)
    sd = theirs.state_dict()
    with pytest.raises(ValueError, match="does not map"):
        dit_state_dict_from_diffusers({**sd, "extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match="no tensor"):
        dit_state_dict_from_diffusers({k: v for k, v in sd.items() if "proj_out_2" not in k}, cfg)


def test_load_errors_name_the_folder(tmp_path) -> None:
    with pytest.raises(ValueError, match="not a folder"):
        load_diffusers_dit(tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        load_diffusers_dit(tmp_path)
    (tmp_path / "config.json").write_text('{"_class_name": "DiTTransformer2DModel"}')
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_diffusers_dit(tmp_path)
