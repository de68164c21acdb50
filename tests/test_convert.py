"""The CLIP converter on bad input: clear errors that name the problem, and nothing left in --out."""

from __future__ import annotations

import json
import os
import shutil
import struct
import zipfile
from typing import Tuple

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import torch_clip
from claver_jax.fileio import atomic_directory
from claver_jax.models import load
from conftest import run_cli
from convert import claver_to_flax, xclip_to_flax
from convert.clip_to_flax import convert, resize_positional_embedding
from convert.common import ConversionError


@pytest.fixture(scope='module')
def openai_state(tiny_clip):
  return torch_clip.hf_to_openai_state_dict(tiny_clip['model'].state_dict())


def assert_nothing_written(out):
  assert not out.exists()
  assert not [p for p in out.parent.iterdir() if p.name.startswith(f'.{out.name}.')], \
      'a temporary directory was left behind'


def test_unknown_format_names_accepted_formats(tmp_path):
  src = tmp_path / 'weights.ckpt'
  src.write_bytes(b'this is not a checkpoint at all')
  out = tmp_path / 'out'
  proc = run_cli('convert.clip_to_flax', f'--src={src}', f'--out={out}', check=False)
  assert proc.returncode != 0
  assert 'Unrecognised checkpoint format' in proc.stderr
  for accepted in ('HF CLIP directory', 'TorchScript archive', 'safetensors'):
    assert accepted in proc.stderr
  assert_nothing_written(out)


@pytest.mark.parametrize('converter,own_flags', [
    ('clip_to_flax', ['--image_size=336']),
    ('claver_to_flax', ['--mask=kmct', r'--ignore_keys=^mit\.']),
    ('xclip_to_flax', [])])
@pytest.mark.slow
def test_every_converter_takes_the_shared_flags_and_fails_in_one_line(converter, own_flags,
                                                                      tmp_path):
  """convert.common defines --src, --out, --bpe, --vision_heads, --text_heads, --overwrite for
  all three commands, and reports bad input as one line."""
  src, out = tmp_path / 'missing.pth', tmp_path / 'out'
  proc = run_cli(f'convert.{converter}', f'--src={src}', f'--out={out}', '--bpe=bpe.txt.gz',
                 '--vision_heads=12', '--text_heads=8', '--overwrite', *own_flags, check=False)
  lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith('Reading ')]
  assert proc.returncode == 1, proc.stderr
  assert lines == [f'error: --src {src} does not exist.'], proc.stderr
  assert_nothing_written(out)


def test_missing_unexpected_and_misshapen_keys_all_listed(openai_state, tmp_path):
  state = dict(openai_state)
  del state['visual.transformer.resblocks.1.ln_2.bias']
  state['visual.extra_head.weight'] = torch.zeros(3, 3)
  state['ln_final.bias'] = torch.zeros(127)
  src = tmp_path / 'broken.safetensors'
  save_file(state, src)
  out = tmp_path / 'out'
  proc = run_cli('convert.clip_to_flax', f'--src={src}', f'--out={out}', check=False)
  assert proc.returncode != 0
  assert 'missing: visual.transformer.resblocks.1.ln_2.bias' in proc.stderr
  assert 'unexpected: visual.extra_head.weight (3, 3)' in proc.stderr
  assert 'shape: ln_final.bias is (127,), expected (128,)' in proc.stderr
  assert_nothing_written(out)


@pytest.mark.parametrize('case,message', [
    ('missing', 'does not exist'),
    ('empty_dir', 'directory without config.json'),
    ('hf_no_weights', 'no weights'),
    ('not_clip_config', 'is not a CLIP config'),
    ('hf_layout_file', 'pass the HF directory'),
    ('resnet', 'ResNet CLIP'),
    ('other_state_dict', 'is not a CLIP state dict'),
    ('corrupt_safetensors', 'not a readable safetensors file'),
    ('truncated_torch', 'truncated or corrupt'),
    ('pickle_not_dict', 'not a state dict'),
    ('already_converted', 'already a claver_jax model directory'),
])
def test_bad_sources(case, message, tiny_clip, converted_hf, tmp_path):
  src = tmp_path / 'src'
  if case == 'empty_dir':
    src.mkdir()
  elif case == 'hf_no_weights':
    src.mkdir()
    shutil.copy(tiny_clip['hf_dir'] / 'config.json', src)
  elif case == 'not_clip_config':
    src.mkdir()
    (src / 'config.json').write_text(json.dumps({'model_type': 'bert', 'hidden_size': 8}))
  elif case == 'hf_layout_file':
    src = tmp_path / 'model.safetensors'
    save_file({k: v.contiguous() for k, v in tiny_clip['model'].state_dict().items()}, src)
  elif case == 'resnet':
    src = tmp_path / 'rn50.safetensors'
    save_file({'visual.layer1.0.conv1.weight': torch.zeros(2, 2)}, src)
  elif case == 'other_state_dict':
    src = tmp_path / 'bert.safetensors'
    save_file({'encoder.layer.0.weight': torch.zeros(2, 2)}, src)
  elif case == 'corrupt_safetensors':
    src = tmp_path / 'clip.safetensors'
    src.write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{garbage')
  elif case == 'truncated_torch':
    src = tmp_path / 'clip.pt'
    torch.save({'a': torch.zeros(100)}, src)
    src.write_bytes(src.read_bytes()[:200])
  elif case == 'pickle_not_dict':
    src = tmp_path / 'clip.pt'
    torch.save([1, 2, 3], src)
  elif case == 'already_converted':
    src = converted_hf
  out = tmp_path / 'out'
  with pytest.raises(ConversionError, match=message):
    convert(src, out)
  assert_nothing_written(out)


def test_hf_config_disagreeing_with_weights(tiny_clip, tmp_path):
  src = tmp_path / 'hf'
  shutil.copytree(tiny_clip['hf_dir'], src)
  config = json.loads((src / 'config.json').read_text())
  config['vision_config']['num_hidden_layers'] = 3
  (src / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ConversionError, match='num_hidden_layers=3 but the weights give 2'):
    convert(src, tmp_path / 'out')


def test_existing_output_is_never_lost(tiny_clip, tmp_path):
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'precious.txt').write_text('keep me')
  proc = run_cli('convert.clip_to_flax', f'--src={tiny_clip["hf_dir"]}', f'--out={out}',
                 check=False)
  assert proc.returncode != 0 and '--overwrite' in proc.stderr
  bad = tmp_path / 'bad.safetensors'
  bad.write_bytes(b'garbage')
  with pytest.raises(ConversionError):
    convert(bad, out, overwrite=True)  # A failed conversion leaves the old output in place.
  assert (out / 'precious.txt').read_text() == 'keep me'
  convert(tiny_clip['hf_dir'], out, overwrite=True)
  assert not (out / 'precious.txt').exists() and (out / 'config.json').is_file()
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.out.')] == []


def test_atomic_directory_cleans_up_on_failure(tmp_path):
  out = tmp_path / 'result'
  with pytest.raises(RuntimeError):
    with atomic_directory(out) as tmp:
      (tmp / 'half.bin').write_bytes(b'x')
      raise RuntimeError('interrupted')
  assert_nothing_written(out)


def test_tokenizer_must_match_the_text_embedding(tiny_clip, tmp_path):
  bpe = tmp_path / 'tiny_bpe.txt'
  bpe.write_text('#version: 0.2\nt h\nth e</w>\n')
  with pytest.raises(ConversionError, match='tokenizer has 516 ids but .* 1000 rows'):
    convert(tiny_clip['hf_dir'], tmp_path / 'out', bpe=bpe)
  assert_nothing_written(tmp_path / 'out')


def test_openai_heads_must_divide_width(openai_state, tmp_path):
  src = tmp_path / 'clip.safetensors'
  save_file(openai_state, src)
  with pytest.raises(ConversionError, match='vision_width=128 is not divisible by vision_heads=3'):
    convert(src, tmp_path / 'out', vision_heads=3)


@pytest.mark.slow
def test_resize_positional_embedding_to_larger_images(tiny_clip, tmp_path):
  out = tmp_path / 'clip48'
  run_cli('convert.clip_to_flax', f'--src={tiny_clip["hf_dir"]}', f'--out={out}',
          '--image_size=48')
  model = load(out)
  assert model.cfg.image_size == 48 and model.cfg.grid_size == 6
  pos = np.asarray(model.visual.positional_embedding[...])
  source = tiny_clip['model'].vision_model.embeddings.position_embedding.weight.detach().numpy()
  assert pos.shape == (37, 128)
  np.testing.assert_array_equal(pos[0], source[0])         # The class position is kept.
  embedding = np.asarray(model.encode_image(np.ones((2, 48, 48, 3), np.float32)))
  assert embedding.shape == (2, 64) and np.isfinite(embedding).all()
  with pytest.raises(ConversionError, match='not a multiple of the patch size 8'):
    convert(tiny_clip['hf_dir'], tmp_path / 'bad', image_size=50)


def test_resize_is_bicubic_over_the_patch_grid():
  grid = np.linspace(0, 1, 8)
  # A smooth field over the 8x8 grid, plus a class row that must stay as it is.
  field = np.stack([np.add.outer(grid, grid), np.multiply.outer(grid, grid)], -1)
  pos = np.concatenate([np.full((1, 2), 7.0), field.reshape(64, 2)]).astype(np.float32)
  np.testing.assert_array_equal(resize_positional_embedding(pos, 8), pos)
  big = resize_positional_embedding(pos, 16)
  assert big.shape == (257, 2) and (big[0] == 7.0).all()
  # Half-pixel centres: output cell i of 16 samples the source at x = (i + .5) / 2 - .5. Where all
  # four cubic taps lie inside the grid (1 <= x <= 6, i.e. i in 3..12) a linear field is exact.
  x = (np.arange(16) + 0.5) / 2 - 0.5
  inner = slice(3, 13)
  expected = np.add.outer(x / 7, x / 7)[inner, inner]
  np.testing.assert_allclose(big[1:].reshape(16, 16, 2)[inner, inner, 0], expected, atol=1e-5)


def test_load_rejects_non_model_directories(tmp_path, converted_hf):
  with pytest.raises(FileNotFoundError, match='convert.clip_to_flax'):
    load(tmp_path)
  edited = tmp_path / 'edited'
  shutil.copytree(converted_hf, edited)
  meta = json.loads((edited / 'config.json').read_text())
  meta['config']['vision_layers'] = 3
  (edited / 'config.json').write_text(json.dumps(meta))
  with pytest.raises(ValueError, match='missing: visual.blocks.2.attn.qkv.kernel'):
    load(edited)


@pytest.mark.slow
def test_safetensors_convert_without_torch(tiny_clip, openai_state, tmp_path):
  """safetensors sources need no torch: convert with `import torch` made to fail."""
  src = tmp_path / 'clip.safetensors'
  save_file(openai_state, src)
  script = ('import sys; sys.modules["torch"] = None\n'
            'from convert.clip_to_flax import convert\n'
            f'convert({str(src)!r}, {str(tmp_path / "a")!r})\n'
            f'convert({str(tiny_clip["hf_dir"])!r}, {str(tmp_path / "b")!r})\n'
            'assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]\n')
  run_cli('', check=True, argv=['-c', script])
  images = tiny_clip['images']
  np.testing.assert_allclose(load(tmp_path / 'a').encode_image(images),
                             tiny_clip['expected']['image'], atol=1e-5)
  np.testing.assert_allclose(load(tmp_path / 'b').encode_image(images),
                             tiny_clip['expected']['image'], atol=1e-5)


def test_directories_record_the_input_normalisation(tiny_clip, converted_hf, tmp_path):
  from claver_jax.data.transforms import CLIP_MEAN, CLIP_STD
  meta = json.loads((converted_hf / 'config.json').read_text())
  assert meta['normalization'] == {'mean': list(CLIP_MEAN), 'std': list(CLIP_STD)}
  src = tmp_path / 'hf'                      # An HF directory says what its processor uses.
  shutil.copytree(tiny_clip['hf_dir'], src)
  (src / 'preprocessor_config.json').write_text(json.dumps(
      {'image_mean': [0.5, 0.5, 0.5], 'image_std': [0.25, 0.25, 0.25]}))
  convert(src, tmp_path / 'out')
  meta = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert meta['normalization'] == {'mean': [0.5] * 3, 'std': [0.25] * 3}


# ---------------------------------------------------------------------------------------------
# Untrusted checkpoints: nothing in them runs
# ---------------------------------------------------------------------------------------------
class HostileModule(torch.nn.Module):
  """A TorchScript module whose __setstate__, run by torch.jit.load, writes `target` (a .pth in a
  site directory would run at the next Python start)."""

  def __init__(self, target: str):
    super().__init__()
    self.weight = torch.nn.Parameter(torch.zeros(2))
    self.target = target
    self.sink = torch.zeros(0, dtype=torch.uint8)

  def forward(self, x):
    return x + self.weight

  @torch.jit.export
  def __getstate__(self) -> Tuple[torch.Tensor, str, bool]:
    return (self.weight, self.target, self.training)

  @torch.jit.export
  def __setstate__(self, state: Tuple[torch.Tensor, str, bool]) -> None:
    self.weight, self.target, self.training = state[0], state[1], state[2]
    written = torch.from_file(state[1], shared=True, size=9, dtype=torch.uint8)
    written.copy_(torch.tensor([105, 109, 112, 111, 114, 116, 32, 111, 115],  # 'import os'
                               dtype=torch.uint8))
    self.sink = written


class MakesDirectory:
  """An object that a plain unpickler turns into os.makedirs(target)."""

  def __init__(self, target):
    self.target = str(target)

  def __reduce__(self):
    return os.makedirs, (self.target,)


@pytest.mark.filterwarnings('ignore::DeprecationWarning')   # torch.jit.script
def test_a_hostile_torchscript_archive_runs_nothing(tmp_path):
  target = tmp_path / 'site' / 'evil.pth'
  target.parent.mkdir()
  archive = tmp_path / 'ViT-B-32.pt'
  torch.jit.save(torch.jit.script(HostileModule(str(target))), str(archive))
  torch.jit.load(str(archive))                 # The attack is real: torch.jit.load writes it.
  assert target.read_bytes() == b'import os'
  target.unlink()
  out = tmp_path / 'out'
  proc = run_cli('convert.clip_to_flax', f'--src={archive}', f'--out={out}', check=False)
  lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith('Reading ')]
  assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith('error: '), proc.stderr
  assert 'holds no tensors' in lines[0]
  hf_dir = tmp_path / 'hf'                     # The same archive as an HF directory's weights.
  hf_dir.mkdir()
  (hf_dir / 'config.json').write_text(json.dumps({'vision_config': {}, 'text_config': {}}))
  shutil.copy(archive, hf_dir / 'pytorch_model.bin')
  for converter, src in [(convert, hf_dir), (claver_to_flax.convert, archive),
                         (xclip_to_flax.convert, archive)]:
    with pytest.raises(ConversionError):
      converter(src, out)
  assert not target.exists() and not list(target.parent.iterdir())
  assert_nothing_written(out)


@pytest.mark.slow
def test_a_pickle_that_calls_a_function_converts_without_calling_it(openai_state, tmp_path):
  """A state dict with an extra entry whose unpickling would call os.makedirs: the weights are
  read, the call never happens (torch.load without weights_only would make the directory)."""
  target = tmp_path / 'made_by_the_checkpoint'
  src = tmp_path / 'clip.pth'
  torch.save({'model': dict(openai_state), 'evil': MakesDirectory(target)}, src)
  torch.load(src, weights_only=False)
  assert target.is_dir()
  target.rmdir()
  convert(src, tmp_path / 'out')
  assert not target.exists()
  reference = tmp_path / 'reference.safetensors'
  save_file(openai_state, reference)
  convert(reference, tmp_path / 'reference')
  images = np.zeros((1, 32, 32, 3), np.float32)
  np.testing.assert_array_equal(load(tmp_path / 'out').encode_image(images),
                                load(tmp_path / 'reference').encode_image(images))


def _crafted_tensor_archive(path, offset: int, size: tuple, stride: tuple, numel: int,
                            stored: int) -> None:
  """A torch.save-style zip whose one tensor is a view of (offset, size, stride) into a float
  storage that claims `numel` elements and holds `stored`."""
  def text(s):
    return b'X' + struct.pack('<I', len(s)) + s.encode()

  def ints(xs):
    return b'(' + b''.join(b'J' + struct.pack('<i', x) for x in xs) + b't'

  pickled = (b'\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(' +
             b'(' + text('storage') + b'ctorch\nFloatStorage\n' + text('0') + text('cpu') +
             b'J' + struct.pack('<i', numel) + b'tQ' + b'J' + struct.pack('<i', offset) +
             ints(size) + ints(stride) + b'\x89ccollections\nOrderedDict\n)RtR.')
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('clip/data.pkl', pickled)
    archive.writestr('clip/data/0', np.zeros(stored, np.float32).tobytes())


@pytest.mark.parametrize('view,message', [
    ((0, (2, 3), (3, 1), 6, 6), None),                       # A well-formed tensor.
    ((4, (2, 3), (3, 1), 6, 6), 'reaches past its storage'),
    ((0, (2, 3), (300, 1), 6, 6), 'reaches past its storage'),
    ((0, (2, 3), (3, 1), 6, 2), 'fewer than its 6 elements'),
])
def test_tensor_views_are_checked_against_their_storage(view, message, tmp_path):
  from convert.torch_pickle import UnsafeCheckpointError, read_archive
  src = tmp_path / 'crafted.pt'
  _crafted_tensor_archive(src, *view)
  if message is None:
    data, torchscript, _ = read_archive(src)
    assert not torchscript and data.shape == (2, 3) and data.dtype == np.float32
    return
  with pytest.raises(UnsafeCheckpointError, match=message):
    read_archive(src)
  with pytest.raises(ConversionError, match=message):
    convert(src, tmp_path / 'out')


def test_legacy_torch_save_format_needs_torch_2_6(openai_state, tmp_path, monkeypatch):
  src = tmp_path / 'legacy.pt'
  torch.save(dict(openai_state), src, _use_new_zipfile_serialization=False)
  assert not zipfile.is_zipfile(src)
  convert(src, tmp_path / 'out')                          # torch.load(weights_only=True)
  monkeypatch.setattr(torch, '__version__', '2.5.1')
  with pytest.raises(ConversionError, match=r'needs torch >= 2\.6, found 2\.5\.1'):
    convert(src, tmp_path / 'out2')


@pytest.mark.parametrize('index', ['model.safetensors.index.json',
                                   'pytorch_model.bin.index.json'])
def test_hf_shard_index_entries_stay_in_the_model_directory(index, tiny_clip, tmp_path):
  outside = tmp_path / 'outside.safetensors'
  shutil.copy(tiny_clip['hf_dir'] / 'model.safetensors', outside)
  src = tmp_path / 'hf'
  src.mkdir()
  shutil.copy(tiny_clip['hf_dir'] / 'config.json', src)
  for shard in (str(outside), '../outside.safetensors', 'sub/../../outside.safetensors'):
    (src / index).write_text(json.dumps({'weight_map': {'logit_scale': shard}}))
    with pytest.raises(ConversionError, match='outside .*shard entries must be file names'):
      convert(src, tmp_path / 'out')
  # Shards inside the directory are read, links included (HF's cache links them to blobs/).
  state = {k: v.contiguous() for k, v in tiny_clip['model'].state_dict().items()}
  names = sorted(state)
  halves = {'part-1': names[:len(names) // 2], 'part-2': names[len(names) // 2:]}
  weight_map = {}
  for part, keys in halves.items():
    if index.startswith('model.safetensors'):
      save_file({k: state[k] for k in keys}, tmp_path / f'{part}.blob')
      os.symlink(tmp_path / f'{part}.blob', src / f'{part}.safetensors')
      weight_map.update({k: f'{part}.safetensors' for k in keys})
    else:
      torch.save({k: state[k] for k in keys}, src / f'{part}.bin')
      weight_map.update({k: f'{part}.bin' for k in keys})
  (src / index).write_text(json.dumps({'weight_map': weight_map}))
  convert(src, tmp_path / 'out')
  np.testing.assert_allclose(load(tmp_path / 'out').encode_image(tiny_clip['images']),
                             tiny_clip['expected']['image'], atol=1e-5)
