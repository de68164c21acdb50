"""Frame sampling, decoding, clip augmentations, normalisation and mixup/cutmix."""

from __future__ import annotations

import tarfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from claver_jax.data import synthetic, transforms
from claver_jax.data.mixup import cutmix_box, mixup_cutmix
from claver_jax.data.sources import FileListSource
from claver_jax.data.video import VideoError, eval_indices, open_video, train_indices


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
class FixedOffsets:
  """Stands in for a Generator: `integers(0, high)` returns high - 1 (the last frame)."""

  def integers(self, low, high):
    return np.asarray(high) - 1


def test_train_indices_one_random_frame_per_segment():
  # 10 frames, 4 segments: starts 0, 2, 5, 7, 10 -> segments [0,2) [2,5) [5,7) [7,10).
  assert train_indices(10, 4, FixedOffsets()).tolist() == [1, 4, 6, 9]
  rng = np.random.default_rng(0)
  for _ in range(50):
    i = train_indices(10, 4, rng)
    assert 0 <= i[0] < 2 <= i[1] < 5 <= i[2] < 7 <= i[3] < 10
  assert train_indices(8, 8, rng).tolist() == list(range(8))


def test_short_videos_loop_their_frames():
  assert train_indices(3, 8, np.random.default_rng(0)).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
  assert eval_indices(3, 5).tolist() == [[0, 1, 2, 0, 1]]
  assert eval_indices(3, 4, num_clips=3).tolist() == [[0, 1, 2, 0], [1, 2, 0, 1], [2, 0, 1, 2]]


def test_eval_indices_centre_frames_and_even_clips():
  # 10 frames, 4 segments of 2.5 frames: centres at 1.25, 3.75, 6.25, 8.75.
  assert eval_indices(10, 4).tolist() == [[1, 3, 6, 8]]
  # 2 clips: fractions 1/4 and 3/4 of each 5-frame segment of 20 frames.
  assert eval_indices(20, 4, num_clips=2).tolist() == [[1, 6, 11, 16], [3, 8, 13, 18]]
  with pytest.raises(ValueError, match='0 frames'):
    eval_indices(0, 4)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def mp4s(tmp_path_factory):
  """Two 40-frame clips: default GOP (one keyframe) and a keyframe every 8 frames."""
  import av
  root = tmp_path_factory.mktemp('mp4s')
  clip, _ = synthetic.make_clip(0, num_frames=40, size=(32, 48))
  for name, gop in (('long_gop.mp4', None), ('short_gop.mp4', 8)):
    with av.open(str(root / name), 'w') as container:
      stream = container.add_stream('libx264', rate=10)
      stream.height, stream.width, stream.pix_fmt = 32, 48, 'yuv420p'
      if gop:
        stream.codec_context.gop_size = gop
      for frame in clip:
        container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format='rgb24')))
      container.mux(stream.encode())
  return root


@pytest.mark.parametrize('name', ['long_gop.mp4', 'short_gop.mp4'])
def test_sampled_frames_equal_a_full_decode(mp4s, name):
  import av
  with av.open(str(mp4s / name)) as container:
    full = np.stack([f.to_ndarray(format='rgb24') for f in container.decode(video=0)])
  with open_video(mp4s / name) as video:
    assert video.num_frames == 40
    if name == 'short_gop.mp4':
      assert len(video._key_positions) > 1, 'the keyframe-jump path is not exercised'
    for indices in ([0, 9, 17, 33, 39], [39, 2, 2, 20], list(range(0, 40, 5))):
      np.testing.assert_array_equal(video.frames(indices), full[indices])
    assert video.frames([5], short_side=16).shape == (1, 16, 24, 3)


def test_tar_members_are_read_in_place(mp4s, tmp_path):
  archive = tmp_path / 'videos.tar'
  with tarfile.open(archive, 'w') as tar:
    tar.add(mp4s / 'short_gop.mp4', arcname='clips/a.mp4')
  (tmp_path / 'list.txt').write_text('clips/a.mp4 0\nclips/absent.mp4 1\n')
  source = FileListSource(archive, tmp_path / 'list.txt')
  with open_video(mp4s / 'short_gop.mp4') as direct:
    np.testing.assert_array_equal(source.open(0).frames([3, 30]), direct.frames([3, 30]))
  with pytest.raises(VideoError, match='no such member'):
    source.open(1)


@pytest.mark.parametrize('content', [b'', b'\x00\x00\x00\x18ftypmp42 garbage', None])
def test_unreadable_videos_raise_video_error(tmp_path, content):
  path = tmp_path / 'bad.mp4'
  if content is not None:
    path.write_bytes(content)
  with pytest.raises(VideoError, match='bad.mp4'):
    open_video(path)


# ---------------------------------------------------------------------------------------------
# Augmentations
# ---------------------------------------------------------------------------------------------
def test_multi_scale_crop_boxes_follow_the_official_pipeline():
  """mmaction2's MultiScaleCrop as the official pipelines configure it: scales (1, .875, .75,
  .66) of the short side, aspect gap 1, and the box at one of 5 fixed offsets (the corners and
  the centre), each of which occurs."""
  rng = np.random.default_rng(0)
  sizes = {int(256 * s) for s in transforms.MULTI_SCALES}   # 256, 224, 192, 168.
  offsets = set()
  for _ in range(300):
    x0, y0, x1, y1 = transforms.multi_scale_crop_box(256, 340, 224, rng)
    assert 0 <= x0 < x1 <= 340 and 0 <= y0 < y1 <= 256
    assert x1 - x0 in sizes and y1 - y0 in sizes
    ranks = sorted(sizes, reverse=True)
    assert abs(ranks.index(x1 - x0) - ranks.index(y1 - y0)) <= 1   # Max aspect gap 1.
    w_step, h_step = (340 - (x1 - x0)) // 4, (256 - (y1 - y0)) // 4
    offsets.add((x0 // w_step if w_step else 'any', y0 // h_step if h_step else 'any'))
  corners_and_centre = {(0, 0), (4, 0), (0, 4), (4, 4), (2, 2)}
  assert {o for o in offsets if 'any' not in o} == corners_and_centre
  assert all(o[0] in (0, 2, 4, 'any') and o[1] in (0, 2, 4, 'any') for o in offsets)


def test_train_augment_keeps_shape_crops_clips_alike_and_jitters_frames_apart():
  """One crop, flip and grayscale per clip; colour jitter drawn per frame, as the official
  pipeline calls torchvision's ColorJitter on each frame."""
  frame = np.random.default_rng(1).integers(0, 256, (1, 73, 97, 3), dtype=np.uint8)
  clip = np.repeat(frame, 6, axis=0)
  changed = 0
  for seed in range(12):
    out = transforms.augment_train_clip(clip, 64, np.random.default_rng(seed), jitter_prob=0.0)
    assert out.shape == (6, 64, 64, 3) and out.dtype == np.uint8
    assert (out == out[:1]).all(), 'the crop, flip or grayscale differed between frames'
    changed += not np.array_equal(out, transforms.augment_train_clip(
        clip, 64, np.random.default_rng(seed + 100), jitter_prob=0.0))
  assert changed >= 10, 'the augmentation hardly depends on its random draws'
  jittered = transforms.augment_train_clip(clip, 64, np.random.default_rng(0), jitter_prob=1.0,
                                           grayscale_prob=0.0)
  assert all(not np.array_equal(jittered[0], f) for f in jittered[1:])


def test_train_augment_resizes_once_from_any_size():
  """A clip at its own size gives what the same clip resized to train_short_side(S) first gives
  (the same crop, one resampling instead of two), and shrinking is not required of the caller."""
  from PIL import Image
  ys, xs = np.mgrid[0:60, 0:80].astype(np.float32)
  smooth = np.stack([xs * 3, ys * 4, (xs + ys) * 1.5], -1).astype(np.uint8)[None]   # 60x80
  side = transforms.train_short_side(48)                                             # 54
  resized = np.asarray(Image.fromarray(smooth[0]).resize((72, side), Image.BILINEAR))[None]
  options = dict(flip_prob=0.0, jitter_prob=0.0, grayscale_prob=0.0)
  for seed in range(8):
    native = transforms.augment_train_clip(smooth, 48, np.random.default_rng(seed), **options)
    two_step = transforms.augment_train_clip(resized, 48, np.random.default_rng(seed), **options)
    assert native.shape == two_step.shape == (1, 48, 48, 3)
    assert np.abs(native.astype(int) - two_step).mean() < 2.5, seed


def test_color_jitter_draws_per_frame_and_is_identity_at_zero():
  rng = np.random.default_rng(0)
  clip = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
  same = transforms.color_jitter(clip, np.random.default_rng(0), 0, 0, 0, 0)
  assert np.abs(same.astype(int) - clip).max() <= 1
  # Brightness alone on a flat gray clip: each frame is scaled by its own factor in [0.6, 1.4].
  flat = np.full((64, 2, 2, 3), 100, np.uint8)
  bright = transforms.color_jitter(flat, np.random.default_rng(3), 0.4, 0, 0, 0)[:, 0, 0, 0]
  assert 60 <= bright.min() and bright.max() <= 140
  assert len(set(bright.tolist())) > 30 and bright.max() - bright.min() > 60
  gray = transforms.grayscale(clip)
  assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()


def test_spatial_crops_along_the_long_side():
  clip = np.arange(2 * 4 * 10 * 3, dtype=np.uint8).reshape(2, 4, 10, 3)
  crops = transforms.spatial_crops(clip, 4, 3)
  assert crops.shape == (3, 2, 4, 4, 3)
  for crop, start in zip(crops, (0, 3, 6)):
    np.testing.assert_array_equal(crop, clip[:, :, start:start + 4])
  np.testing.assert_array_equal(transforms.spatial_crops(clip, 4, 1)[0], clip[:, :, 3:7])


def test_normalize_uses_clip_mean_std_and_is_jittable():
  video = np.full((1, 2, 2, 2, 3), 255, np.uint8)
  out = jax.jit(transforms.normalize)(video)
  expected = (1 - np.array(transforms.CLIP_MEAN)) / np.array(transforms.CLIP_STD)
  np.testing.assert_allclose(out[0, 0, 0, 0], expected, rtol=1e-6)
  assert out.dtype == jnp.float32


# ---------------------------------------------------------------------------------------------
# Mixup / CutMix
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_mixup_cutmix_targets_sum_to_one():
  video = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 16, 16, 3)), jnp.float32)
  labels = jnp.array([0, 3, 3, 9])
  step = jax.jit(lambda rng, switch: mixup_cutmix(rng, video, labels, 10, switch_prob=switch))
  for switch in (0.0, 1.0):     # All mixup, then all cutmix.
    for seed in range(3):
      mixed, targets = step(jax.random.key(seed), switch)
      assert mixed.shape == video.shape and targets.shape == (4, 10)
      np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
      assert float(targets.min()) >= 0.1 / 10 - 1e-6      # Smoothing keeps every class > 0.
      # Sample 0 is mixed with sample 1: its target mass splits between their labels.
      lam = (float(targets[0, 0]) - 0.01) / 0.9
      np.testing.assert_allclose(targets[0, 3], 0.01 + 0.9 * (1 - lam), rtol=1e-5)
      np.testing.assert_allclose(targets[2, [3, 9]], targets[3, [9, 3]], rtol=1e-5)  # 2 with 3
      if switch == 1.0:
        kept = np.isclose(np.asarray(mixed[0]), np.asarray(video[0])).all(axis=(0, -1))
        np.testing.assert_allclose(kept.mean(), lam, atol=1e-5)  # lambda = the kept area.
      else:
        np.testing.assert_allclose(mixed[0], lam * video[0] + (1 - lam) * video[1], atol=1e-4)


@pytest.mark.parametrize('mixup_alpha,cutmix_alpha', [(0.0, 1.0), (0.8, 0.0), (0.0, 0.0)])
def test_an_alpha_of_zero_turns_its_branch_off(mixup_alpha, cutmix_alpha):
  """timm's rule: cutmix only, mixup only, or neither (plain label smoothing), never NaN."""
  video = jnp.asarray(np.random.default_rng(0).normal(size=(4, 2, 16, 16, 3)), jnp.float32)
  labels = jnp.array([0, 3, 3, 9])
  step = jax.jit(lambda rng: mixup_cutmix(rng, video, labels, 10, mixup_alpha=mixup_alpha,
                                          cutmix_alpha=cutmix_alpha, switch_prob=0.5))
  smoothed = np.asarray(jax.nn.one_hot(labels, 10)) * 0.9 + 0.01
  for seed in range(20):
    mixed, targets = map(np.asarray, step(jax.random.key(seed)))
    assert np.isfinite(mixed).all() and np.isfinite(targets).all(), seed
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-5)
    lam = (targets[0, 0] - 0.01) / 0.9
    if mixup_alpha == 0 and cutmix_alpha == 0:
      np.testing.assert_array_equal(mixed, video)
      np.testing.assert_allclose(targets, smoothed, rtol=1e-6)
    elif mixup_alpha == 0:        # Every step a box: each pixel is its own or its partner's.
      kept = np.isclose(mixed[0], video[0]).all(axis=(0, -1))
      assert (kept | np.isclose(mixed[0], video[1]).all(axis=(0, -1))).all()
      np.testing.assert_allclose(kept.mean(), lam, atol=1e-5)
    else:                         # Every step a blend (never an empty box, as a NaN one is).
      assert 0 < lam < 1 - 1e-6, seed
      np.testing.assert_allclose(mixed[0], lam * video[0] + (1 - lam) * video[1], atol=1e-4)


def test_cutmix_box_area_corrects_lambda():
  mask, lam = cutmix_box(jax.random.key(0), jnp.float32(0.6), 20, 30)
  np.testing.assert_allclose(lam, 1 - mask.mean(), rtol=1e-6)
