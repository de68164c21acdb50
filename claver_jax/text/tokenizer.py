"""CLIP's BPE tokenizer on transformers' `CLIPTokenizer`, with OpenAI CLIP's exact ids.

    >>> tok = load_tokenizer('bpe_simple_vocab_16e6.txt.gz')   # or a dir with vocab.json + merges.txt
    >>> tok(['a video of a person dancing.'])                   # int32 [1, 77]: 49406 ... 49407 0 0 ...

Text longer than the context is truncated and keeps its end-of-text token last (OpenAI's
`clip.tokenize` raises instead unless `truncate=True`).
"""

from __future__ import annotations

import gzip
import html
import json
import os
import re
from pathlib import Path
from typing import Sequence

import numpy as np

SOT = '<|startoftext|>'
EOT = '<|endoftext|>'
# OpenAI's `bpe_simple_vocab_16e6.txt.gz` has more merges than CLIP uses: it takes the first
# 49152 - 256 - 2 of them, which with 512 byte tokens and 2 specials gives 49408 ids.
OPENAI_NUM_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable characters.

  The order matters: CLIP's first 256 ids are these characters in this order, the printable
  bytes first (as themselves), then the other bytes (as chr(256), chr(257), ...).
  """
  printable = (list(range(ord('!'), ord('~') + 1)) + list(range(ord('¡'), ord('¬') + 1))
               + list(range(ord('®'), ord('ÿ') + 1)))
  others = [b for b in range(256) if b not in printable]
  return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def read_openai_bpe(path: str | os.PathLike,
                    num_merges: int = OPENAI_NUM_MERGES) -> tuple[dict[str, int], list[str]]:
  """OpenAI's BPE merges file (.txt or .txt.gz) -> (vocab, merges) in HF's CLIP format."""
  path = Path(path)
  opener = gzip.open if path.suffix == '.gz' else open
  try:
    with opener(path, 'rt', encoding='utf-8') as f:
      lines = f.read().split('\n')
  except (OSError, UnicodeDecodeError, EOFError) as e:
    raise ValueError(f'Cannot read {path} as a CLIP BPE merges file '
                     f'(like bpe_simple_vocab_16e6.txt.gz): {e}') from e
  merges = [m for m in lines[1:num_merges + 1] if m]
  bad = next((i for i, m in enumerate(merges) if len(m.split()) != 2), None)
  if bad is not None or not merges:
    raise ValueError(f'{path} is not a CLIP BPE merges file: line {(bad or 0) + 2} is '
                     f'{merges[bad]!r} where a pair "a b" was expected.' if merges else
                     f'{path} is not a CLIP BPE merges file: it has no merges.')
  byte_chars = list(bytes_to_unicode().values())
  tokens = byte_chars + [c + '</w>' for c in byte_chars] + [''.join(m.split()) for m in merges]
  tokens += [SOT, EOT]
  return {t: i for i, t in enumerate(tokens)}, merges


def read_vocab_merges(directory: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
  """A directory with HF's vocab.json + merges.txt -> (vocab, merges)."""
  from etils import epath
  directory = epath.Path(directory)                     # Local or gs://.
  vocab = json.loads((directory / 'vocab.json').read_bytes().decode('utf-8'))
  lines = (directory / 'merges.txt').read_bytes().decode('utf-8').split('\n')
  merges = [m for m in lines if m and not m.startswith('#version')]
  return vocab, merges


class Tokenizer:
  """Texts -> int32 [N, context_length]: start token, BPE ids, end token, zero padding."""

  def __init__(self, vocab: dict[str, int], merges: Sequence[str]):
    from transformers import CLIPTokenizer  # Deferred: importing transformers is slow.
    missing = [t for t in (SOT, EOT) if t not in vocab]
    if missing:
      raise ValueError(f'The vocabulary lacks CLIP\'s special tokens {missing}; a CLIP vocab.json '
                       'ends with <|startoftext|> and <|endoftext|>.')
    self.vocab, self.merges = dict(vocab), list(merges)
    # Pairs, not 'a b' strings: tokenizers' BPE rejects the latter.
    self._hf = CLIPTokenizer(vocab=self.vocab, merges=[tuple(m.split()) for m in self.merges])
    self.sot_token_id = vocab[SOT]
    self.eot_token_id = vocab[EOT]
    self.vocab_size = len(vocab)

  @staticmethod
  def clean(text: str) -> str:
    """OpenAI's cleaning (unescape HTML twice, collapse whitespace); HF's normaliser lowercases."""
    text = html.unescape(html.unescape(text))
    return re.sub(r'\s+', ' ', text).strip()

  def encode(self, texts: Sequence[str]) -> list[list[int]]:
    """BPE ids of each text, without start/end tokens."""
    cleaned = [self.clean(t) for t in texts]
    return self._hf(cleaned, add_special_tokens=False)['input_ids']

  def __call__(self, texts: str | Sequence[str], context_length: int = 77) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    if context_length < 2:
      raise ValueError(f'context_length={context_length} leaves no room for start and end tokens.')
    out = np.zeros((len(texts), context_length), np.int32)
    for i, ids in enumerate(self.encode(texts)):
      ids = [self.sot_token_id] + ids[:context_length - 2] + [self.eot_token_id]
      out[i, :len(ids)] = ids
    return out

  def num_truncated(self, texts: Sequence[str], context_length: int = 77) -> int:
    """How many of `texts` do not fit `context_length` with their start and end tokens."""
    return sum(len(ids) > context_length - 2 for ids in self.encode(texts))


def train_tokenizer(texts: Sequence[str], out_dir: str | os.PathLike,
                    num_merges: int = 1000, min_frequency: int = 2) -> Tokenizer:
  """Learns a small BPE vocabulary on `texts` and writes it to OUT_DIR in CLIP's format
  (vocab.json + merges.txt, put in place together: OUT_DIR is replaced as a whole).

  Words are split by CLIP's tokenizer itself (transformers' `CLIPTokenizer` normaliser and
  pre-tokeniser); merges are learnt by pair frequency with ties broken by the pair's text, so the
  same texts always give the same vocabulary (the `tokenizers` trainer breaks ties in hash order,
  which changes from process to process). The vocabulary has CLIP's layout: the 256 byte
  characters, the same with '</w>', the merges in order, then <|startoftext|> and <|endoftext|>
  (end-of-text is the largest id, as OpenAI-style argmax pooling expects). For models trained
  from scratch, e.g. the demo, where no CLIP vocabulary can ship.
  """
  import collections
  from transformers import CLIPTokenizer
  backend = CLIPTokenizer().backend_tokenizer
  normalizer, splitter = backend.normalizer, backend.pre_tokenizer
  words: collections.Counter = collections.Counter()
  for text in texts:
    for piece, _ in splitter.pre_tokenize_str(normalizer.normalize_str(Tokenizer.clean(text))):
      words[tuple(piece[:-1]) + (piece[-1] + '</w>',)] += 1
  merges: list[str] = []
  while len(merges) < num_merges:
    pairs: collections.Counter = collections.Counter()
    for word, count in words.items():
      for pair in zip(word, word[1:]):
        pairs[pair] += count
    if not pairs:
      break
    best = min(pairs, key=lambda p: (-pairs[p], p))
    if pairs[best] < min_frequency:
      break
    merges.append(' '.join(best))
    merged = {}
    for word, count in words.items():
      out, i = [], 0
      while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == best:
          out.append(word[i] + word[i + 1])
          i += 2
        else:
          out.append(word[i])
          i += 1
      merged[tuple(out)] = merged.get(tuple(out), 0) + count
    words = collections.Counter(merged)
  byte_chars = list(bytes_to_unicode().values())
  tokens = byte_chars + [c + '</w>' for c in byte_chars]
  known = set(tokens)
  for m in merges:
    merged_token = m.replace(' ', '')
    if merged_token not in known:
      tokens.append(merged_token)
      known.add(merged_token)
  vocab = {t: i for i, t in enumerate(tokens + [SOT, EOT])}
  from claver_jax.fileio import atomic_directory, run_path
  with atomic_directory(run_path(out_dir), overwrite=True) as tmp:   # Both files, or neither.
    (tmp / 'vocab.json').write_text(json.dumps(vocab, ensure_ascii=False), encoding='utf-8')
    (tmp / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n',
                                    encoding='utf-8')
  return Tokenizer(vocab, merges)


def is_url(path: str | os.PathLike) -> bool:
  from claver_jax.fileio import is_remote
  return is_remote(path)


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
  """PATH: OpenAI's BPE file (.txt.gz), a directory with vocab.json + merges.txt, or a model
  directory whose tokenizer/ holds them (local or gs://)."""
  from claver_jax.fileio import resolve_link, run_path
  path = resolve_link(run_path(path)) if is_url(path) else Path(path)
  if path.is_file():
    return Tokenizer(*read_openai_bpe(path))
  for directory in (path, path / 'tokenizer'):
    if (directory / 'vocab.json').is_file() and (directory / 'merges.txt').is_file():
      return Tokenizer(*read_vocab_merges(directory))
  raise FileNotFoundError(
      f'No CLIP tokenizer at {path}: pass OpenAI\'s bpe_simple_vocab_16e6.txt.gz, a directory with '
      'vocab.json and merges.txt, or a converted model directory that has tokenizer/.')
