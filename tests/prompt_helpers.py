"""Test helpers for prompts and generation: a tiny CLIP vocab, a tiny GPT-2, a fake LLM server."""

from __future__ import annotations

import contextlib
import http.server
import json
import re
import string
import threading
from pathlib import Path
from typing import Iterator


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
