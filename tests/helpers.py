"""Shared test helpers, in one module: tiny model configs, the configs as the CLI loads them, a few
train steps, small on-disk video sets, a tiny CLIP vocabulary and GPT-2, a fake LLM server.

The run config of the tests is tests/tiny_config.py (a --config file); the PyTorch reference
models are tests/torch_*.py. Nothing here imports claver_jax.models or flax at import time
(seconds): data worker processes import this module for `square_or_die` and `cache_one_or_die`.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import re
import shutil
import string
import threading
from pathlib import Path
from typing import Iterator

import numpy as np

from claver_jax.data import synthetic

REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------- configs
def load_config(name: str, arg: str | None = None):
  """configs/NAME.py's get_config(ARG), as `--config=configs/NAME.py:ARG` loads it."""
  from claver_jax.cli import _load_config
  return _load_config(f'{REPO / "configs" / name}.py' + (f':{arg}' if arg else ''))


@functools.cache
def tiny_clip():
  """A tiny CLIP whose vision width gives 2 temporal heads (width / 64): 16 px frames of 2 x 2
  patches, so T=4 frames are 4 x 5 tokens; a 2-layer ViT, a 1-layer text tower of 8 tokens."""
  from claver_jax.models import CLIPConfig
  return CLIPConfig(embed_dim=32, image_size=16, patch_size=8, vision_width=128, vision_layers=2,
                    vision_heads=2, vision_mlp_dim=256, context_length=8, vocab_size=100,
                    text_width=64, text_layers=1, text_heads=1, text_mlp_dim=128)


def run_towers(vocab: dict[str, int] | None = None, **overrides):
  """The towers of tests/tiny_config.py as a CLIPConfig (16 px, a 1-layer ViT of width 64, a
  1-layer text tower of width 32); with `vocab` (token -> id) its size and end-of-text id."""
  import tiny_config
  from claver_jax.models import CLIPConfig
  config = tiny_config.get_config()
  fields = {**config.model.clip.to_dict(), 'image_size': config.data.image_size}
  if vocab is not None:
    fields.update(vocab_size=len(vocab), eos_token_id=vocab['<|endoftext|>'])
  return CLIPConfig(**{**fields, **overrides})


# ------------------------------------------------------------------------------- train steps
def steps_on_cached_texts(model, config, tokens: np.ndarray, rng: np.random.Generator,
                          steps: int = 4):
  """Runs `steps` train steps on one batch of 8 uint8 clips of 4 frames of 16² (labels 0..2),
  with the text embeddings of `tokens` [A, C, S] cached as train_and_evaluate makes them
  (unnormalised). Returns (losses, model state before, after) as pure dicts."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from claver_jax import evaluate, optim, sharding
  from claver_jax.models import families
  from claver_jax.models.clip import pool_index
  from claver_jax.step import make_train_step
  family = families.of(model)
  tx, _ = optim.make_optimizer(config.optim, family.group_of, total_steps=10, steps_per_epoch=10)
  optimizer = nnx.Optimizer(model, tx, wrt=optim.trainable_filter(config.optim, family.group_of))
  text = nnx.jit(lambda m, t: evaluate.encode_texts(m.encode_text, t))(model, tokens)
  graphdef, state = nnx.split((model, optimizer))
  step = jax.jit(make_train_step(graphdef, config, sharding.make_mesh(config.mesh),
                                 pool_index(tokens, model.cfg.clip) + 1, True, family.group_of))
  batch = {'video': rng.integers(0, 256, (8, 4, 16, 16, 3), dtype=np.uint8),
           'label': np.arange(8, dtype=np.int32) % 3}
  before = nnx.to_pure_dict(nnx.state(model))
  losses = []
  for i in range(steps):
    state, out = step(state, batch, text, jnp.asarray(i + 1, jnp.int32))
    losses.append(float(out['loss']))
  return losses, before, nnx.to_pure_dict(nnx.state(nnx.merge(graphdef, state)[0]))


def unchanged(before, after) -> bool:
  """Every array of two (sub)trees equal."""
  import jax
  return all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


# ------------------------------------------------------------------------------- videos on disk
def synthetic_dir(out: Path, num_videos: int = 24, num_frames: int = 8, size: int = 32) -> Path:
  """The synthetic motion set as mp4s + train.txt, val.txt, labels.csv under `out`."""
  return synthetic.write_dataset(out, num_videos, num_frames=num_frames, size=size,
                                 progress=False)


def with_bad_videos(src: Path, out: Path) -> Path:
  """A copy of a synthetic dir whose train.txt line 1 is corrupt and line 2 missing."""
  shutil.copytree(src, out)
  lines = (out / 'train.txt').read_text().splitlines()
  corrupt, missing = (line.rsplit(' ', 1)[0] for line in lines[:2])
  (out / corrupt).write_bytes(b'\x00\x00\x00\x18ftypmp42 this is not a video')
  (out / missing).unlink()
  return out


def black_video(path: Path, num_frames: int, height: int, width: int) -> Path:
  """A "video bomb" in small: `num_frames` black frames, which H.264 stores in a few bytes each."""
  synthetic.write_mp4(path, np.zeros((num_frames, height, width, 3), np.uint8), fps=25, crf=51)
  return path


def square_or_die(value: int) -> int:
  """value ** 2, except that 3 kills its own process as the out-of-memory killer would."""
  import os
  import signal
  if value == 3:
    os.kill(os.getpid(), signal.SIGKILL)
  return value * value


def cache_one_or_die(job):
  """prepare's encoder, except that a video whose name contains 'die' kills its process."""
  from claver_jax.data import prepare
  if 'die' in job.name:
    square_or_die(3)
  return prepare._cache_one(job)
def synthetic_train_config(**overrides):
  """config.data for a few small clips of the in-memory synthetic set (no files)."""
  from claver_jax.data.pipeline import default_config
  cfg = default_config()
  cfg.update(dict(source='synthetic', synthetic_videos=30, synthetic_frames=4, synthetic_size=16,
                  num_frames=4, image_size=16, batch_size=8, eval_batch_size=4, flip_prob=0.0))
  cfg.update(overrides)
  return cfg


# ------------------------------------------------------------------------------- tokenizers, LLMs
def tiny_clip_vocab(num_ids: int = 1000) -> tuple[dict[str, int], list[str]]:
  """CLIP's format in small: 512 byte tokens, letter-pair merges, the two specials."""
  from claver_jax.text.tokenizer import bytes_to_unicode
  letters = string.ascii_lowercase
  merges = [f'{a} {b}</w>' for a in letters for b in letters][:num_ids - 514]
  chars = list(bytes_to_unicode().values())
  tokens = chars + [c + '</w>' for c in chars] + [m.replace(' ', '') for m in merges]
  tokens += ['<|startoftext|>', '<|endoftext|>']
  return {t: i for i, t in enumerate(tokens)}, merges


def write_tiny_clip_vocab(directory: Path) -> Path:
  """vocab.json + merges.txt of `tiny_clip_vocab` in `directory` (for load_tokenizer)."""
  vocab, merges = tiny_clip_vocab()
  directory.mkdir(parents=True, exist_ok=True)
  (directory / 'vocab.json').write_text(json.dumps(vocab))
  (directory / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
  return directory


def write_tiny_gpt2(directory: Path, corpus: list[str], seed: int = 0) -> Path:
  """A random 2-layer GPT-2 and a byte-level BPE trained on `corpus`, as an HF directory."""
  import torch
  from tokenizers import ByteLevelBPETokenizer
  from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
  bpe = ByteLevelBPETokenizer()
  bpe.train_from_iterator(corpus, vocab_size=600, min_frequency=1,
                          special_tokens=['<|endoftext|>'])
  tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token='<|endoftext|>',
                                      bos_token='<|endoftext|>', unk_token='<|endoftext|>')
  eos = tokenizer.convert_tokens_to_ids('<|endoftext|>')
  config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, n_embd=32, n_layer=2,
                      n_head=2, bos_token_id=eos, eos_token_id=eos)
  torch.manual_seed(seed)
  GPT2LMHeadModel(config).save_pretrained(directory)
  tokenizer.save_pretrained(directory)
  return directory


class FakeLLM:
  """Canned answers of an OpenAI-compatible server, with failures on demand; records requests.

  A completion for action X and aspect A cycles through messy variants of 'A text K of X'
  (numbering, quotes, a second line, duplicates, empty), so the client has to clean them.
  """

  def __init__(self):
    self.requests: list[tuple[str, dict]] = []
    self.transient_failures = 0   # The next this many requests get 503.
    self.fail_actions: set[str] = set()  # Actions whose requests get 400.
    self.counters: dict[tuple[str, str], int] = {}
    self.lock = threading.Lock()

  @staticmethod
  def parse(prompt: str) -> tuple[str, str]:
    from claver_jax.text.generate import COMMANDS
    aspect = next(a for a, command in COMMANDS.items() if prompt.startswith(command))
    action = re.fullmatch(r'(.*) =>', prompt.rsplit('\n', 1)[-1]).group(1)
    return action, aspect

  def answer(self, action: str, aspect: str) -> str:
    k = self.counters.get((action, aspect), 0)
    self.counters[(action, aspect)] = k + 1
    variants = [f' {aspect} text {k} of {action}\nsomething else => more',
                f' 1. "{aspect} text {k} of {action}."',
                f' {aspect.upper()} TEXT {k - 1} OF {action}',  # A duplicate of the previous.
                '',
                f'  - {aspect}   text {k}  of {action}   ']
    return variants[k % len(variants)]

  def handle(self, path: str, body: dict) -> tuple[int, dict]:
    with self.lock:
      self.requests.append((path, body))
      if path == '/v1/models':
        return 200, {'object': 'list', 'data': [{'id': 'fake-llm', 'object': 'model'}]}
      if path not in ('/v1/completions', '/v1/chat/completions'):
        return 404, {'error': {'message': f'no route {path}'}}
      if self.transient_failures > 0:
        self.transient_failures -= 1
        return 503, {'error': {'message': 'warming up'}}
      prompt = body['messages'][-1]['content'] if path == '/v1/chat/completions' else body['prompt']
      action, aspect = self.parse(prompt)
      if action in self.fail_actions:
        return 400, {'error': {'message': f'refusing {action}'}}
      texts = [self.answer(action, aspect) for _ in range(body.get('n', 1))]
      if path == '/v1/chat/completions':
        choices = [{'index': i, 'message': {'role': 'assistant', 'content': t.strip()}}
                   for i, t in enumerate(texts)]
      else:
        choices = [{'index': i, 'text': t} for i, t in enumerate(texts)]
      return 200, {'object': 'text_completion', 'model': body['model'], 'choices': choices}


@contextlib.contextmanager
def fake_llm_server() -> Iterator[tuple[str, FakeLLM]]:
  """Serves a FakeLLM on 127.0.0.1 (an ephemeral port) in a thread; yields (base_url, llm)."""
  llm = FakeLLM()

  class Handler(http.server.BaseHTTPRequestHandler):

    def _reply(self, status: int, payload: dict) -> None:
      data = json.dumps(payload).encode()
      self.send_response(status)
      self.send_header('Content-Type', 'application/json')
      self.send_header('Content-Length', str(len(data)))
      self.end_headers()
      self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server's name)
      self._reply(*llm.handle(self.path, {}))

    def do_POST(self):  # noqa: N802
      body = json.loads(self.rfile.read(int(self.headers['Content-Length'])))
      self._reply(*llm.handle(self.path, body))

    def log_message(self, *args):
      del args

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}/v1', llm
  finally:
    server.shutdown()
    server.server_close()
