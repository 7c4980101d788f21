"""Interoperability with other libraries; each adapter imports its library lazily, if at all.

- :mod:`difflab.interop.diffusers`: diffusers ``UNet2DModel`` folders in (config, weights,
  scheduler), difflab runs out (:func:`export_to_diffusers`), and :func:`import_to_run`.
- :mod:`difflab.interop.diffusers_dit`: diffusers ``DiTTransformer2DModel`` configs, weights
  and folders in and out of difflab's :class:`~difflab.nn.dit.DiT`.

The package re-exports the public names (``__all__``) of each adapter module.
"""

from difflab.interop import diffusers, diffusers_dit, diffusers_export
from difflab.interop.diffusers import *  # noqa: F403 (the names of diffusers.__all__)
from difflab.interop.diffusers_dit import *  # noqa: F403 (the names of its __all__)
from difflab.interop.diffusers_export import *  # noqa: F403 (the names of its __all__)

__all__ = [*diffusers.__all__, *diffusers_dit.__all__, *diffusers_export.__all__]
