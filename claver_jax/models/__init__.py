"""Models: CLIP towers (`clip`), model directories (`io`)."""

from claver_jax.models.clip import CLIP, CLIPConfig, PRESETS, get_preset
from claver_jax.models.io import load, read_model_config, write_model_dir

__all__ = ['CLIP', 'CLIPConfig', 'PRESETS', 'get_preset', 'load', 'read_model_config',
           'write_model_dir']
