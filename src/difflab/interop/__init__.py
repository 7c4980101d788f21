"""Interoperability with other libraries; each adapter imports its library lazily, if at all.

- :mod:`difflab.interop.diffusers`: diffusers ``UNet2DModel`` folders in (config, weights,
  scheduler), difflab runs out (:func:`export_to_diffusers`), and :func:`import_to_run`.
"""

from difflab.interop.diffusers import (
    DiffusersModel,
    DiffusersTimeDenoiser,
    diffusers_config_from_unet,
    diffusers_timestep,
    load_diffusers,
    schedule_from_diffusers,
    scheduler_config_from_schedule,
    state_dict_from_diffusers,
    state_dict_to_diffusers,
    unet_config_from_diffusers,
)
from difflab.interop.diffusers_export import (
    ImportedRun,
    ModelCardInfo,
    closest_preset,
    export_to_diffusers,
    import_to_run,
    model_card,
)

__all__ = [
    "DiffusersModel",
    "ImportedRun",
    "ModelCardInfo",
    "closest_preset",
    "export_to_diffusers",
    "import_to_run",
    "model_card",
    "DiffusersTimeDenoiser",
    "diffusers_config_from_unet",
    "diffusers_timestep",
    "load_diffusers",
    "schedule_from_diffusers",
    "scheduler_config_from_schedule",
    "state_dict_from_diffusers",
    "state_dict_to_diffusers",
    "unet_config_from_diffusers",
]
