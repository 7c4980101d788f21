"""Interoperability with other libraries; each adapter imports its library lazily, if at all.

- :mod:`difflab.interop.diffusers`: diffusers ``UNet2DModel`` folders in (config, weights,
  scheduler), difflab runs out (:func:`export_to_diffusers`), and :func:`import_to_run`.

The package re-exports the public names (``__all__``) of each adapter module.
"""

from difflab.interop import diffusers, diffusers_export
from difflab.interop.diffusers import *  # noqa: F403 (the names of diffusers.__all__)
from difflab.interop.diffusers_export import *  # noqa: F403 (the names of its __all__)

__all__ = [*diffusers.__all__, *diffusers_export.__all__]
