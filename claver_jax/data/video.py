"""Video decoding with PyAV and frame sampling (TSN segments for training, multi-clip for eval).

    >>> video = open_video('clip.mp4')              # or open_video(io.BytesIO(data), name=...)
    >>> indices = train_indices(video.num_frames, 8, np.random.default_rng(0))
    >>> frames = video.frames(indices, short_side=256)   # uint8 [8, 256, W', 3]

Only the sampled frames are decoded where the container allows it: the packets are demuxed
(cheap, no decoding), and decoding starts at the last keyframe before each sampled frame instead
of at the start of the file. Containers without packet timestamps are decoded front to back.

`stream_frames` decodes a whole video one frame at a time (what `data.prepare` encodes), within
`DecodeLimits`: frames, frames x pixels and seconds per video. Every failure to read a video,
whatever PyAV raised (FFmpegError, BlockingIOError and other OSErrors, MemoryError), is a
VideoError that names the file.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import os
import time
from typing import Iterator, Protocol, Sequence

import numpy as np


class VideoError(ValueError):
  """A video that cannot be read: missing, empty, corrupt, without a video stream, or past a
  decoding limit (DecodeLimits)."""


@dataclasses.dataclass(frozen=True)
class DecodeLimits:
  """What decoding one video may cost before it is refused as a VideoError naming the file and
  the limit: frames, frames x pixels (at the stored size, before any resize) and wall-clock
  seconds. The defaults pass any clip of the paper's datasets (Kinetics' 10 s, HMDB's and UCF's
  longest at 1080p) with a wide margin and stop a small file that declares a flood of frames
  (a "video bomb": 81 KB of 2000 black 720p frames, 3.9 MB of 300k frames)."""

  max_frames: int = 30_000                  # 16 min 40 s at 30 fps.
  max_pixels: int = 20_000 * 1920 * 1080    # 20,000 frames of 1080p, 11 min at 30 fps.
  max_seconds: float = 300.0

  def check(self, name: str, frames: int, pixels: int, started: float) -> None:
    """Raises VideoError when `frames` frames of `pixels` pixels in all, decoded since the
    monotonic time `started`, pass a limit."""
    if frames > self.max_frames:
      raise VideoError(f'{name}: more than {self.max_frames} frames (the max_frames limit); '
                       'raise it (data.prepare --max_frames) to read this video')
    if pixels > self.max_pixels:
      raise VideoError(f'{name}: more than {self.max_pixels} pixels in its first {frames} frames '
                       '(the max_pixels limit on frames x height x width); raise it (data.prepare '
                       '--max_pixels) to read this video')
    if time.monotonic() - started > self.max_seconds:
      raise VideoError(f'{name}: decoding took more than {self.max_seconds:g} s (the '
                       f'max_seconds limit, after {frames} frames); raise it (data.prepare '
                       '--max_decode_seconds) to read this video')


class Video(Protocol):
  """A readable clip: its frame count and its frames at given indices. A context manager: use
  it in a `with` block, which closes what it holds (a container, a file) when the block ends."""

  num_frames: int

  def frames(self, indices: Sequence[int], short_side: int | None = None,
             enlarge: bool = True) -> np.ndarray:
    """uint8 [len(indices), H, W, 3]; the short side resized to `short_side` when given (only
    when it is longer, with enlarge=False)."""

  def close(self) -> None:
    """Releases the file and decoder; frames() cannot be called after."""

  def __enter__(self) -> Video:
    ...

  def __exit__(self, *exc) -> None:
    ...


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------
def train_indices(num_frames: int, num_samples: int, rng: np.random.Generator) -> np.ndarray:
  """TSN sampling: `num_samples` equal segments, one uniformly random frame in each.

  Segment i covers frames [floor(i n / T), floor((i + 1) n / T)). A video with fewer frames than
  T loops them: 0, 1, .., n - 1, 0, 1, ... Returns int64 [T].
  """
  _check_counts(num_frames, num_samples)
  if num_frames < num_samples:
    return np.arange(num_samples) % num_frames
  starts = np.arange(num_samples + 1) * num_frames // num_samples
  return starts[:-1] + rng.integers(0, starts[1:] - starts[:-1])


def eval_indices(num_frames: int, num_samples: int, num_clips: int = 1) -> np.ndarray:
  """Deterministic multi-clip sampling, int64 [num_clips, T].

  Clip k takes, in each of the T equal segments, the frame at fraction (k + 1/2) / num_clips of
  the segment: for one clip that is each segment's centre frame, for several they are evenly
  spaced. A video with fewer frames than T loops them, clip k starting at frame k n // num_clips.
  """
  _check_counts(num_frames, num_samples)
  clips = np.arange(num_clips)[:, None]
  if num_frames < num_samples:
    return (np.arange(num_samples)[None] + clips * num_frames // num_clips) % num_frames
  positions = (np.arange(num_samples)[None] + (clips + 0.5) / num_clips) * num_frames / num_samples
  return np.minimum(np.floor(positions).astype(np.int64), num_frames - 1)


def _check_counts(num_frames: int, num_samples: int) -> None:
  if num_frames < 1 or num_samples < 1:
    raise ValueError(f'Cannot sample {num_samples} frames from a video of {num_frames} frames.')


def resized_shape(height: int, width: int, short_side: int | None,
                  enlarge: bool = True) -> tuple[int, int]:
  """(height, width) with the short side scaled to `short_side`, aspect ratio kept; unchanged
  when short_side is None, or with enlarge=False when the short side is not longer."""
  if short_side is None or (not enlarge and min(height, width) <= short_side):
    return height, width
  scale = short_side / min(height, width)
  return (short_side if height <= width else max(1, round(height * scale)),
          short_side if width < height else max(1, round(width * scale)))


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------
class InMemory:
  """The `Video` context-manager methods of a video that holds no file: nothing to release."""

  def close(self) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, *exc) -> None:
    self.close()


class ArrayVideo(InMemory):
  """Frames already in memory (uint8 [N, H, W, 3]) behind the `Video` interface."""

  def __init__(self, frames: np.ndarray):
    self._frames = frames
    self.num_frames = len(frames)

  def frames(self, indices: Sequence[int], short_side: int | None = None,
             enlarge: bool = True) -> np.ndarray:
    selected = self._frames[np.asarray(indices)]
    h, w = resized_shape(*selected.shape[1:3], short_side, enlarge)
    if (h, w) == selected.shape[1:3]:
      return selected
    from PIL import Image
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR))
                     for f in selected])


def mp4_damage(source: str | os.PathLike | io.IOBase) -> str | None:
  """How an MP4/MOV (ISO BMFF) file is damaged, from its top-level boxes, or None when it is not
  one or its boxes are whole: 'truncated: ...' (a box runs past the end of the file),
  'corrupt ...' (no 'moov' box, the index a player needs) or 'empty: ...' (any file of 0 bytes)."""
  own = not isinstance(source, io.IOBase)
  try:
    f = open(source, 'rb') if own else source
  except OSError:
    return None
  try:
    start = f.tell()
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    if size == 0:
      return 'empty: the file has 0 bytes'
    if f.read(8)[4:8] != b'ftyp':
      return None
    position, boxes = 0, []
    while position + 8 <= size:
      f.seek(position)
      header = f.read(16)
      length, kind = int.from_bytes(header[:4], 'big'), header[4:8].decode('latin-1')
      if length == 1 and len(header) == 16:
        length = int.from_bytes(header[8:16], 'big')
      elif length == 0:
        length = size - position
      if length < 8:
        return f'corrupt: the box at byte {position} declares {length} bytes'
      if position + length > size:
        return (f'truncated: the file has {size} bytes, but its {kind!r} box runs from byte '
                f'{position} to {position + length}')
      boxes.append(kind)
      position += length
    if 'moov' not in boxes:
      return f"corrupt or truncated: it has no 'moov' box (the index of the frames); boxes: {boxes}"
    return None
  finally:
    if own:
      f.close()
    else:
      f.seek(start)


class PyAVVideo:
  """A video file decoded with PyAV; see the module docstring for how frames are found. Close it
  (or use it as a context manager): the container holds a file and decoder buffers."""

  def __init__(self, source: str | os.PathLike | io.IOBase, name: str,
               limits: DecodeLimits = DecodeLimits()):
    self.name = name
    self._source = source
    self._limits = limits
    self._container = _open_container(source, name, self._error)
    try:
      self._index()
    except BaseException:
      self.close()
      raise

  def _error(self, what: str) -> VideoError:
    """A VideoError saying what failed, and first whether the file is truncated or corrupt."""
    damage = mp4_damage(self._source)
    return VideoError(f'{self.name}: {damage}; {what}' if damage else f'{self.name}: {what}')

  def _index(self) -> None:
    """Finds the video stream and the frames' timestamps and keyframes."""
    if not self._container.streams.video:
      raise self._error('the container has no video stream')
    self._stream = self._container.streams.video[0]
    started, self._packets = time.monotonic(), []
    try:
      for packet in self._container.demux(self._stream):
        if packet.size:
          self._packets.append(packet)
          if len(self._packets) > self._limits.max_frames or not len(self._packets) % 1000:
            self._limits.check(self.name, len(self._packets), 0, started)
    except VideoError:
      raise
    except Exception as e:  # noqa: BLE001 (PyAV raises OSErrors, MemoryError, ...)
      raise self._error(f'cannot demux ({type(e).__name__}: {e})') from e
    self._seekable = bool(self._packets) and all(p.pts is not None for p in self._packets)
    if self._seekable:
      self._frame_pts = sorted(p.pts for p in self._packets)
      self._key_positions = [i for i, p in enumerate(self._packets) if p.is_keyframe]
      self._key_pts = [self._packets[i].pts for i in self._key_positions]
      self._seekable = self._key_pts == sorted(self._key_pts)
    if self._seekable:
      self.num_frames = len(self._frame_pts)
    else:
      self._all_frames = self._decode_all()
      self.num_frames = len(self._all_frames)
    if self.num_frames == 0:
      raise self._error('the video stream has no frames')

  def close(self) -> None:
    self._container.close()

  def __enter__(self) -> PyAVVideo:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def _decode_all(self) -> list:
    try:
      self._container.seek(0)
      return list(self._container.decode(self._stream))
    except Exception as e:  # noqa: BLE001 (PyAV raises OSErrors, MemoryError, ...)
      raise self._error(f'cannot decode ({type(e).__name__}: {e})') from e

  def _decode_at(self, wanted: set[int]) -> dict[int, object]:
    """Decodes the frames with pts in `wanted`, jumping to keyframes over gaps: pts -> frame."""
    context = self._stream.codec_context
    found: dict[int, object] = {}
    position, flushed = 0, False
    try:
      context.flush_buffers()  # A previous call may have drained the decoder to its end.
      for target in sorted(wanted):
        key = bisect.bisect_right(self._key_pts, target) - 1
        if key >= 0 and self._key_positions[key] > position and target not in found:
          context.flush_buffers()
          position, flushed = self._key_positions[key], False
        while target not in found:
          if position < len(self._packets):
            frames = context.decode(self._packets[position])
            position += 1
          elif not flushed:
            frames, flushed = context.decode(None), True
          else:
            raise self._error(f'the frame at pts {target} never decoded')
          found.update((f.pts, f) for f in frames if f.pts in wanted)
    except VideoError:
      raise
    except Exception as e:  # noqa: BLE001 (PyAV raises OSErrors, MemoryError, ...)
      raise self._error(f'cannot decode ({type(e).__name__}: {e})') from e
    return found

  def frames(self, indices: Sequence[int], short_side: int | None = None,
             enlarge: bool = True) -> np.ndarray:
    """uint8 [len(indices), H, W, 3]; see `Video.frames`."""
    indices = [int(i) for i in indices]
    if self._seekable:
      pts = [self._frame_pts[i] for i in indices]
      decoded = self._decode_at(set(pts))
      selected = [decoded[p] for p in pts]
    else:
      selected = [self._all_frames[i] for i in indices]
    h, w = resized_shape(selected[0].height, selected[0].width, short_side, enlarge)
    converted = {}
    try:
      for frame in selected:
        if id(frame) not in converted:
          converted[id(frame)] = frame.to_ndarray(format='rgb24', width=w, height=h)
    except Exception as e:  # noqa: BLE001 (PyAV raises OSErrors, MemoryError, ...)
      raise self._error(f'cannot convert a frame ({type(e).__name__}: {e})') from e
    return np.stack([converted[id(f)] for f in selected])


def _open_container(source: str | os.PathLike | io.IOBase, name: str, error):
  """av.open(source), its failures as VideoErrors (`error(what)` makes them)."""
  import av
  try:
    return av.open(source if isinstance(source, io.IOBase) else os.fspath(source))
  except FileNotFoundError as e:
    raise VideoError(f'{name}: no such file') from e
  except Exception as e:  # noqa: BLE001 (PyAV raises OSErrors, MemoryError, ...)
    raise error(f'not a readable video ({type(e).__name__}: {e})') from e


def open_video(source: str | os.PathLike | io.IOBase, name: str | None = None,
               limits: DecodeLimits = DecodeLimits()) -> PyAVVideo:
  """Opens a video file or file-like object; raises VideoError if it cannot be read."""
  return PyAVVideo(source, name or _name_of(source), limits)


def _name_of(source: str | os.PathLike | io.IOBase) -> str:
  return os.fspath(source) if not isinstance(source, io.IOBase) else '<stream>'


def stream_frames(source: str | os.PathLike | io.IOBase, name: str | None = None, *,
                  short_side: int | None = None,
                  limits: DecodeLimits = DecodeLimits()) -> Iterator[np.ndarray]:
  """Every frame of a video in order, one at a time: uint8 [H, W, 3], the short side resized to
  `short_side` while converting (swscale). Holds one decoded frame at a time; stops with a
  VideoError naming the file at the first limit passed (the stream's declared frame count and
  size are checked before anything is decoded)."""
  name = name or _name_of(source)

  def error(what: str) -> VideoError:
    damage = mp4_damage(source)
    return VideoError(f'{name}: {damage}; {what}' if damage else f'{name}: {what}')

  container = _open_container(source, name, error)
  frames = pixels = 0
  try:
    if not container.streams.video:
      raise error('the container has no video stream')
    stream = container.streams.video[0]
    declared = stream.frames or 0
    limits.check(name, declared, declared * stream.codec_context.width *
                 stream.codec_context.height, time.monotonic())
    started = time.monotonic()
    for frame in container.decode(stream):
      frames, pixels = frames + 1, pixels + frame.width * frame.height
      limits.check(name, frames, pixels, started)
      h, w = resized_shape(frame.height, frame.width, short_side)
      yield frame.to_ndarray(format='rgb24', width=w, height=h)
  except VideoError:
    raise
  except Exception as e:  # noqa: BLE001 (PyAV raises OSErrors, MemoryError, ...)
    raise error(f'cannot decode frame {frames} ({type(e).__name__}: {e})') from e
  finally:
    container.close()
  if frames == 0:
    raise error('the video stream has no frames')

