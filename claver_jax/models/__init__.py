"""Models: CLIP towers (`clip`), Kronecker masks (`kronecker`), temporal heads (`temporal`),
CLAVER (`claver`) and model directories (`io`)."""

from claver_jax.models.claver import CLAVER, CLAVERConfig, claver_from_clip, with_num_frames
from claver_jax.models.clip import CLIP, CLIPConfig, PRESETS, get_preset
from claver_jax.models.io import load, read_model_config, write_model_dir
from claver_jax.models.kronecker import MASK_KINDS, kronecker_mask
from claver_jax.models.temporal import TEMPORAL_KINDS

__all__ = ['CLAVER', 'CLAVERConfig', 'CLIP', 'CLIPConfig', 'MASK_KINDS', 'PRESETS',
           'TEMPORAL_KINDS', 'claver_from_clip', 'get_preset', 'kronecker_mask', 'load',
           'read_model_config', 'with_num_frames', 'write_model_dir']
