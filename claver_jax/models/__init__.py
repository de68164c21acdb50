"""Models: CLIP towers (`clip`), Kronecker masks (`kronecker`), temporal heads (`temporal`), the
video families CLAVER (`claver`), X-CLIP (`xclip`) and motion prompts (`motion_prompts`) and their
registry (`families`), and model directories (`io`)."""

from claver_jax.models.claver import CLAVER, CLAVERConfig, claver_from_clip
from claver_jax.models.clip import CLIP, CLIPConfig, PRESETS, get_preset
from claver_jax.models.families import FAMILIES, with_num_frames
from claver_jax.models.io import (input_normalization, load, load_towers, load_video_model,
                                  read_model_config, write_model_dir)
from claver_jax.models.kronecker import MASK_KINDS, kronecker_mask
from claver_jax.models.motion_prompts import (MotionPrompts, MotionPromptsConfig,
                                              motion_prompts_from_clip)
from claver_jax.models.temporal import TEMPORAL_KINDS
from claver_jax.models.xclip import XCLIP, XCLIPConfig, xclip_from_clip

__all__ = ['CLAVER', 'CLAVERConfig', 'CLIP', 'CLIPConfig', 'FAMILIES', 'MASK_KINDS',
           'MotionPrompts', 'MotionPromptsConfig', 'PRESETS', 'TEMPORAL_KINDS', 'XCLIP',
           'XCLIPConfig', 'claver_from_clip', 'get_preset', 'input_normalization',
           'kronecker_mask', 'load', 'load_towers', 'load_video_model', 'motion_prompts_from_clip',
           'read_model_config', 'with_num_frames', 'write_model_dir', 'xclip_from_clip']
