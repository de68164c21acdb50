"""The CLIP tokenizer reproduces OpenAI CLIP's ids; files in every accepted form load the same."""

from __future__ import annotations

import gzip
import html
import json
import shutil

import numpy as np
import pytest
import regex
from safetensors.torch import save_file

import torch_clip
from helpers import tiny_clip_vocab
from claver_jax.models import load
from claver_jax.text import Tokenizer, load_tokenizer
from claver_jax.text.tokenizer import read_openai_bpe
from conftest import CLIP_BPE, requires_clip_bpe, run_cli
from convert.clip_to_flax import convert


# ------------------------------------------------------------------------------------------------
# A reference: OpenAI's `SimpleTokenizer` algorithm, written out here in plain Python (without
# ftfy's mojibake repair, which these clean strings do not need).
# ------------------------------------------------------------------------------------------------
class ReferenceBPE:

  def __init__(self, bpe_path):
    merges = gzip.open(bpe_path).read().decode('utf-8').split('\n')[1:49152 - 256 - 2 + 1]
    merges = [tuple(m.split()) for m in merges]
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs = bs[:]
    n = 0
    for b in range(256):
      if b not in bs:
        bs.append(b)
        cs.append(256 + n)
        n += 1
    self.byte_encoder = dict(zip(bs, map(chr, cs)))
    vocab = list(self.byte_encoder.values())
    vocab = vocab + [v + '</w>' for v in vocab] + [''.join(m) for m in merges]
    vocab += ['<|startoftext|>', '<|endoftext|>']
    self.encoder = {v: i for i, v in enumerate(vocab)}
    self.ranks = {m: i for i, m in enumerate(merges)}
    self.pattern = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
        r"""[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

  def bpe(self, token):
    word = tuple(token[:-1]) + (token[-1] + '</w>',)
    while len(word) > 1:
      pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
      best = min(pairs, key=lambda p: self.ranks.get(p, float('inf')))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == best:
          merged.append(word[i] + word[i + 1])
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = tuple(merged)
    return word

  def encode(self, text):
    text = regex.sub(r'\s+', ' ', html.unescape(html.unescape(text)).strip()).strip().lower()
    ids = []
    for token in regex.findall(self.pattern, text):
      token = ''.join(self.byte_encoder[b] for b in token.encode('utf-8'))
      ids.extend(self.encoder[t] for t in self.bpe(token))
    return ids


TEXTS = [
    'a photo of a cat',
    'A video of a person PLAYING basketball.',
    "It's 3:45pm, don't stop!! We've they'll I'm you'd",
    '  multiple   spaces\tand\nnewlines  ',
    'rock &amp; roll &amp;amp; blues',
    'café naïve résumé Über',
    'emoji 🙂 and 日本語 text',
    'ice-skating, hula-hooping; 2 people (slowly) #1 @home',
    'supercalifragilisticexpialidocious antidisestablishmentarianism',
    '',
]


@pytest.fixture(scope='module')
def real_tokenizer():
  return load_tokenizer(CLIP_BPE)


@requires_clip_bpe
def test_known_openai_ids(real_tokenizer):
  # Ids as OpenAI's clip.tokenize gives them.
  row = real_tokenizer(['a photo of a cat'])[0]
  np.testing.assert_array_equal(row[:8], [49406, 320, 1125, 539, 320, 2368, 49407, 0])
  assert (row[7:] == 0).all()
  np.testing.assert_array_equal(real_tokenizer('a diagram')[0, :4], [49406, 320, 22697, 49407])
  assert real_tokenizer.vocab_size == 49408


@requires_clip_bpe
def test_matches_reference_bpe(real_tokenizer):
  reference = ReferenceBPE(CLIP_BPE)
  got = real_tokenizer(TEXTS)
  assert got.dtype == np.int32 and got.shape == (len(TEXTS), 77)
  for text, row in zip(TEXTS, got):
    ids = [49406] + reference.encode(text) + [49407]
    np.testing.assert_array_equal(row[:len(ids)], ids, err_msg=repr(text))
    assert (row[len(ids):] == 0).all()


@requires_clip_bpe
def test_truncation_keeps_end_of_text(real_tokenizer):
  reference = ReferenceBPE(CLIP_BPE)
  text = 'a person is juggling three flaming torches while riding a unicycle ' * 8
  row = real_tokenizer([text])[0]
  assert row[0] == 49406 and row[-1] == 49407 and (row != 0).all()
  np.testing.assert_array_equal(row[1:-1], reference.encode(text)[:75])
  assert real_tokenizer.num_truncated([text, 'short']) == 1


@requires_clip_bpe
def test_vocab_merges_directory_equals_bpe_file(real_tokenizer, tmp_path):
  vocab, merges = read_openai_bpe(CLIP_BPE)
  (tmp_path / 'vocab.json').write_text(json.dumps(vocab))
  (tmp_path / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
  np.testing.assert_array_equal(load_tokenizer(tmp_path)(TEXTS), real_tokenizer(TEXTS))


@requires_clip_bpe
@pytest.mark.slow
def test_converter_stores_openai_tokenizer(real_tokenizer, tmp_path):
  """--bpe puts the tokenizer into the model directory; load_tokenizer(DIR) and the model work."""
  model = torch_clip.randomize_(torch_clip.OpenAICLIP(vocab=49408, context=77))
  src = tmp_path / 'clip.safetensors'
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, src)
  out = tmp_path / 'flax'
  run_cli('convert.clip_to_flax', f'--src={src}', f'--out={out}', f'--bpe={CLIP_BPE}')
  tokens = load_tokenizer(out)(TEXTS[:3])
  np.testing.assert_array_equal(tokens, real_tokenizer(TEXTS[:3]))
  import torch
  with torch.no_grad():
    expected = model.encode_text(torch.from_numpy(tokens).long()).numpy()
  np.testing.assert_allclose(load(out).encode_text(tokens), expected, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Always run: a small synthetic vocabulary in CLIP's format.
# ------------------------------------------------------------------------------------------------
def test_synthetic_vocab_shapes_padding_truncation():
  tok = Tokenizer(*tiny_clip_vocab())
  assert (tok.sot_token_id, tok.eot_token_id, tok.vocab_size) == (998, 999, 1000)
  out = tok(['ab', 'ab cd', 'x' * 40], context_length=8)
  assert out.shape == (3, 8) and out.dtype == np.int32
  ab = tok.vocab['ab</w>']
  np.testing.assert_array_equal(out[0], [998, ab, 999, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(out[1, :4], [998, ab, tok.vocab['cd</w>'], 999])
  assert out[2, 0] == 998 and out[2, -1] == 999 and (out[2] != 0).all()
  np.testing.assert_array_equal(tok('ab', context_length=8), out[:1])
  with pytest.raises(ValueError, match='context_length'):
    tok(['ab'], context_length=1)


def test_hf_directory_tokenizer_travels_with_the_conversion(tiny_clip, tmp_path):
  vocab, merges = tiny_clip_vocab(torch_clip.VOCAB)
  hf_dir = tmp_path / 'hf'
  shutil.copytree(tiny_clip['hf_dir'], hf_dir)
  (hf_dir / 'vocab.json').write_text(json.dumps(vocab))
  (hf_dir / 'merges.txt').write_text('#version: 0.2\n' + '\n'.join(merges) + '\n')
  convert(hf_dir, tmp_path / 'flax')
  texts = ['ab cd ef', 'zz top']
  np.testing.assert_array_equal(load_tokenizer(tmp_path / 'flax')(texts, context_length=16),
                                load_tokenizer(hf_dir)(texts, context_length=16))
  # A directory with only tokenizer.json (fast-tokenizer checkpoints) works too.
  only_json = tmp_path / 'hf_json'
  shutil.copytree(tiny_clip['hf_dir'], only_json)
  Tokenizer(vocab, merges)._hf.backend_tokenizer.save(str(only_json / 'tokenizer.json'))
  convert(only_json, tmp_path / 'flax_json')
  np.testing.assert_array_equal(load_tokenizer(tmp_path / 'flax_json')(texts),
                                load_tokenizer(hf_dir)(texts))


def test_bad_tokenizer_paths(tmp_path):
  with pytest.raises(FileNotFoundError, match='vocab.json and merges.txt'):
    load_tokenizer(tmp_path)
  bad = tmp_path / 'bpe.txt.gz'
  bad.write_bytes(b'not gzip')
  with pytest.raises(ValueError, match='Cannot read'):
    load_tokenizer(bad)
  wrong = tmp_path / 'merges.txt'
  wrong.write_text('#version\nonly-one-token\n')
  with pytest.raises(ValueError, match='not a CLIP BPE merges file'):
    load_tokenizer(wrong)
  with pytest.raises(ValueError, match='special tokens'):
    Tokenizer({'a': 0}, [])


def test_trained_vocabulary_is_deterministic_and_covers_its_texts(tmp_path):
  """The demo learns its vocabulary; two processes must learn the same one (hash-seeded tie
  breaking in a trainer would differ between processes), in CLIP's layout."""
  script = ('import sys\n'
            'from claver_jax.text.tokenizer import train_tokenizer\n'
            'from claver_jax.text.prompts import build_prompt_texts, load_prompt_set\n'
            'from claver_jax.data import synthetic\n'
            'texts, _ = build_prompt_texts(synthetic.CLASS_NAMES, load_prompt_set("synthetic_motion"))\n'
            'train_tokenizer([t for r in texts for t in r], sys.argv[1], num_merges=300)\n')
  for name in ('a', 'b'):
    run_cli('', argv=['-c', script, str(tmp_path / name)])
  assert (tmp_path / 'a' / 'merges.txt').read_text() == (tmp_path / 'b' / 'merges.txt').read_text()
  tok = load_tokenizer(tmp_path / 'a')
  assert tok.eot_token_id == tok.vocab_size - 1 and tok.sot_token_id == tok.vocab_size - 2
  assert len(tok.merges) == 300
  from claver_jax.text.prompts import build_prompt_texts, load_prompt_set
  from claver_jax.data import synthetic
  texts, _ = build_prompt_texts(synthetic.CLASS_NAMES, load_prompt_set('synthetic_motion'))
  ids = tok([t for r in texts for t in r], context_length=77)
  assert (ids[:, 1:] == tok.eot_token_id).sum() == len(ids)     # Only the real end tokens.
