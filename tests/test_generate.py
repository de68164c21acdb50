"""The prompt generator: few-shot prompts, cleaning, both backends, resume, retries, errors."""

from __future__ import annotations

import contextlib
import http.server
import json
import socket
import sys
import threading
import time

import pytest

from claver_jax.text.generate import (COMMANDS, EXAMPLES, GenerationError, HFBackend,
                                      OpenAIBackend, ServerAnswerError, clean_completion,
                                      dedup_key, few_shot_prompt, generate_prompt_set)
from claver_jax.text.prompts import ASPECTS, read_prompt_set
from conftest import run_cli
from helpers import fake_llm_server, write_tiny_gpt2

CLASSES = ['ApplyEyeMakeup', 'brush hair', 'moving left']


def client(base_url, **kwargs):
  return OpenAIBackend(base_url, 'fake-llm', backoff=0.001, **kwargs)


def free_port() -> int:
  """A port where nothing listens (bound, then released)."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def check_texts(result, per_aspect):
  for c, entry in result.items():
    assert list(entry) == list(ASPECTS)
    for aspect, texts in entry.items():
      assert len(texts) <= per_aspect, (c, aspect)
      assert len({dedup_key(t) for t in texts}) == len(texts), (c, aspect, texts)
      for t in texts:
        assert t == t.strip() and '\n' not in t and '=>' not in t and len(t.split()) <= 77


# ------------------------------------------------------------------------------------------------
# Prompts and cleaning
# ------------------------------------------------------------------------------------------------
def test_few_shot_prompt_shape():
  for aspect, words in [('decomposition', 'Decompose'), ('synonyms', 'synonyms'),
                        ('body_parts', 'parts of the body')]:
    prompt = few_shot_prompt('ApplyEyeMakeup', aspect)
    command, shots = prompt.split('\n\n')
    assert words in command and 'at most 77 words' in command and command == COMMANDS[aspect]
    lines = shots.split('\n')
    assert len(lines) == 4 and all(' => ' in line for line in lines[:3])
    assert lines[3] == 'apply eye makeup =>'
  # The action asked about is never one of its own examples.
  prompt = few_shot_prompt('playing basketball', 'synonyms')
  assert prompt.count('playing basketball') == 1 and EXAMPLES['synonyms'][3][0] in prompt
  with pytest.raises(ValueError, match='Unknown aspect'):
    few_shot_prompt('x', 'colour')


@pytest.mark.parametrize('completion, expected', [
    (' hands dribble the ball\nmaking tea => boil', 'hands dribble the ball'),
    (' 1. "Leaping  over a bar."  ', 'Leaping over a bar.'),
    ('- bounding forward', 'bounding forward'),
    ('\nthe next line is not kept', None),
    ('   ', None),
    (' 42 ...', None),
    (' odd\x16 bytes\ufffd here\u200b', 'odd bytes here'),
    (' high jump => a copied example', None),
    (' Brush Hair.', None),  # Only the class name again.
    (' ' + 'word ' * 100, ' '.join(['word'] * 77)),
])
def test_clean_completion(completion, expected):
  assert clean_completion(completion, 'brush hair') == expected


# ------------------------------------------------------------------------------------------------
# The openai backend against a fake server
# ------------------------------------------------------------------------------------------------
def test_openai_backend_writes_a_clean_set_and_retries(tmp_path, caplog):
  out = tmp_path / 'prompts.json'
  with fake_llm_server() as (url, llm):
    llm.transient_failures = 2
    result = generate_prompt_set(CLASSES, client(url, concurrency=4), out, per_aspect=3,
                                 progress=False)
  assert read_prompt_set(out) == result and list(result) == CLASSES
  assert json.loads(out.read_text()) == result
  check_texts(result, 3)
  assert result['brush hair']['synonyms'] == ['synonyms text 0 of brush hair',
                                              'synonyms text 1 of brush hair.',
                                              'synonyms text 4 of brush hair']
  assert 'HTTP 503; retrying' in caplog.text
  posts = [body for path, body in llm.requests if path == '/v1/completions']
  assert sum(1 for _ in posts) > 9  # 9 prompts, 2 retried, and rounds topping up duplicates.
  body = posts[0]
  assert (body['model'], body['temperature'], body['top_p'], body['stop']) == (
      'fake-llm', 0.9, 0.95, ['\n'])
  assert body['prompt'].endswith('\napply eye makeup =>') and body['n'] == 3


def test_openai_chat_endpoint(tmp_path):
  with fake_llm_server() as (url, llm):
    result = generate_prompt_set(CLASSES[:1], client(url, chat=True), tmp_path / 'p.json',
                                 per_aspect=2, progress=False)
  assert {p for p, _ in llm.requests} == {'/v1/chat/completions'}
  assert result['ApplyEyeMakeup']['body_parts'] == ['body_parts text 0 of apply eye makeup',
                                                    'body_parts text 1 of apply eye makeup.']


def test_resume_tops_up_and_skips_complete_classes(tmp_path):
  out = tmp_path / 'prompts.json'
  done = {a: [f'{a} one', f'{a} two'] for a in ASPECTS}
  partial = {'decomposition': ['kept text'], 'synonyms': [], 'body_parts': []}
  out.write_text(json.dumps({'ApplyEyeMakeup': done, 'brush hair': partial,
                             'old class': done}))
  with fake_llm_server() as (url, llm):
    result = generate_prompt_set(CLASSES, client(url), out, per_aspect=2, progress=False)
  asked = {llm.parse(body['prompt'])[0] for path, body in llm.requests if 'prompt' in body}
  assert asked == {'brush hair', 'moving left'}
  assert result['ApplyEyeMakeup'] == done and result['old class'] == done
  assert result['brush hair']['decomposition'] == ['kept text',
                                                   'decomposition text 0 of brush hair']
  assert list(read_prompt_set(out)) == CLASSES + ['old class']
  out.write_text('{"broken": ')
  with pytest.raises(GenerationError, match='Cannot resume .*--overwrite'):
    generate_prompt_set(CLASSES, client('http://127.0.0.1:1'), out, progress=False)


def test_cli_interrupted_then_resumed(tmp_path):
  labels = tmp_path / 'labels.csv'
  labels.write_text('id,name\n' + ''.join(f'{i},{c}\n' for i, c in enumerate(CLASSES)))
  out = tmp_path / 'prompts.json'
  args = [f'--labels={labels}', f'--out={out}', '--backend=openai', '--model=fake-llm',
          '--per_aspect=2', '--batch_size=3', '--backoff=0.001']
  with fake_llm_server() as (url, llm):
    llm.fail_actions = {'brush hair'}
    proc = run_cli('claver_jax.text.generate', *args, f'--base_url={url}', check=False)
    assert proc.returncode == 1 and 'HTTP 400' in proc.stderr and 'refusing brush hair' in (
        proc.stderr)
    assert list(read_prompt_set(out)) == ['ApplyEyeMakeup']  # Written before the failure.
    llm.fail_actions = set()
    llm.requests.clear()
    proc = run_cli('claver_jax.text.generate', *args, f'--base_url={url[:-3]}')
  assert 'Resuming' in proc.stderr and 'Wrote' in proc.stdout
  asked = {llm.parse(body['prompt'])[0] for path, body in llm.requests if 'prompt' in body}
  assert asked == {'brush hair', 'moving left'}
  result = read_prompt_set(out)
  assert list(result) == CLASSES and all(len(t) == 2 for e in result.values() for t in e.values())


def test_unreachable_server_is_a_clear_error(tmp_path):
  port = free_port()
  with pytest.raises(GenerationError, match=f'Cannot reach .*127.0.0.1:{port}/v1 .*after 2 '
                     'attempts.*vllm serve'):
    client(f'http://127.0.0.1:{port}', max_attempts=2).check()
  labels = tmp_path / 'labels.csv'
  labels.write_text('0,jumping\n')
  proc = run_cli('claver_jax.text.generate', f'--labels={labels}', f'--out={tmp_path / "o.json"}',
                 '--backend=openai', '--model=m', f'--base_url=http://127.0.0.1:{port}',
                 '--max_attempts=1', check=False)
  assert proc.returncode == 1 and 'error: Cannot reach' in proc.stderr
  assert not (tmp_path / 'o.json').exists()


def test_error_statuses_are_not_retried():
  with fake_llm_server() as (url, llm):
    llm.fail_actions = {'x'}
    with pytest.raises(ServerAnswerError, match='HTTP 400 .*attempt 1 of 5.*refusing x'):
      client(url).complete([few_shot_prompt('x', 'synonyms')], [1], seed=0)
    with pytest.raises(ServerAnswerError, match='HTTP 404'):
      client(url[:-3] + '/other').complete(['x =>'], [1], seed=0)
    llm.transient_failures = 5
    with pytest.raises(ServerAnswerError, match='HTTP 503 .*attempt 3 of 3'):
      client(url, max_attempts=3).complete([few_shot_prompt('y', 'synonyms')], [1], seed=0)
    client(url).check()  # The server answers /models.


# ------------------------------------------------------------------------------------------------
# The hf backend with a tiny random GPT-2
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def tiny_gpt2(tmp_path_factory):
  import torch
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # A tiny model: thread hand-offs cost more than they save.
  corpus = [few_shot_prompt(c, a) for c in CLASSES for a in ASPECTS]
  yield write_tiny_gpt2(tmp_path_factory.mktemp('gpt2'), corpus)
  torch.set_num_threads(threads)


def test_hf_backend_plumbing_and_file_format(tiny_gpt2, tmp_path):
  backend = HFBackend(tiny_gpt2, max_new_tokens=6, batch_size=4, device='cpu')
  prompts = ['moving left =>', few_shot_prompt('brush hair', 'synonyms')]
  samples = backend.complete(prompts, [3, 2], seed=0)  # Two batches: 4 rows, then 1.
  assert [len(s) for s in samples] == [3, 2] and all(isinstance(t, str) for s in samples for t in s)
  assert backend.complete(prompts, [3, 2], seed=0) == samples  # Seeded.
  out = tmp_path / 'prompts.json'
  result = generate_prompt_set(CLASSES[:2], backend, out, per_aspect=2, max_rounds=2,
                               progress=False)
  assert result == read_prompt_set(out) and list(result) == CLASSES[:2]
  check_texts(result, 2)  # Gibberish, but one clean line per sample, de-duplicated.
  assert sum(len(t) for e in result.values() for t in e.values()) > 0


def test_hf_backend_errors(tmp_path, monkeypatch):
  with pytest.raises(GenerationError, match='not a local model directory with config.json'):
    HFBackend(tmp_path / 'meta-llama/Meta-Llama-3-8B')
  (tmp_path / 'config.json').write_text('{"model_type": "gpt2"}')
  with pytest.raises(GenerationError, match='Cannot load a causal LM'):
    HFBackend(tmp_path)
  monkeypatch.setitem(sys.modules, 'torch', None)
  with pytest.raises(GenerationError, match='needs PyTorch'):
    HFBackend(tmp_path)


# ------------------------------------------------------------------------------------------------
# Hostile and broken servers: each answer becomes a retry or one error line, never a hang
# ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def hostile_server(behaviour):
  """Serves `behaviour(handler)` for every GET and POST on 127.0.0.1; yields (base_url, log),
  log listing (path, Authorization header) of every request."""
  log, stop = [], threading.Event()

  class Handler(http.server.BaseHTTPRequestHandler):
    def _serve(self):
      log.append((self.path, self.headers.get('Authorization')))
      if self.headers.get('Content-Length'):
        self.rfile.read(int(self.headers['Content-Length']))
      with contextlib.suppress(OSError):
        behaviour(self, stop)

    do_GET = do_POST = _serve  # noqa: N815 (http.server's names)

    def log_message(self, *args):
      del args

  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
  server.daemon_threads = True
  threading.Thread(target=server.serve_forever, daemon=True).start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}/v1', log
  finally:
    stop.set()
    server.shutdown()
    server.server_close()


def reply(handler, status: int, body: bytes, **headers) -> None:
  handler.send_response(status)
  for key, value in {'Content-Length': str(len(body)), **headers}.items():
    handler.send_header(key, value)
  handler.end_headers()
  handler.wfile.write(body)


def completion(text) -> bytes:
  return json.dumps({'choices': [{'index': 0, 'text': text}]}).encode()


def test_the_api_key_never_follows_a_redirect_to_another_origin(caplog):
  """Two ports of 127.0.0.1 are two origins: a 302 from one to the other is refused with a key
  (urllib would send the key along); a redirect within the origin is followed."""
  with hostile_server(lambda h, _: reply(h, 200, completion(' a text'))) as (other, other_log):
    def redirect(handler, _):
      target = other if handler.path.startswith('/v1/completions') else '/v1/elsewhere'
      if handler.path == '/v1/elsewhere':
        reply(handler, 200, completion(' same origin'))
      else:
        reply(handler, 302, b'', Location=target + '/completions' if target == other else target)
    with hostile_server(redirect) as (url, log):
      with pytest.raises(GenerationError, match='another origin: not followed, as the API key'):
        client(url, api_key='sk-secret').complete(['x =>'], [1], seed=0)
      assert other_log == [] and log == [('/v1/completions', 'Bearer sk-secret')]
      assert client(url).complete(['x =>'], [1], seed=0) == [[' a text']]  # No key: followed.
      assert other_log == [('/v1/completions', None)]
      log.clear()
      keyed = client(url, api_key='sk-secret')
      assert keyed._request('/models', parse=keyed._texts) == [' same origin']
      assert log == [('/v1/models', 'Bearer sk-secret'), ('/v1/elsewhere', 'Bearer sk-secret')]
  assert 'plain http' not in caplog.text                 # Loopback: no warning.
  client('http://10.1.2.3:8000/v1', api_key='sk-secret')
  assert 'The API key goes to http://10.1.2.3:8000/v1 over plain http' in caplog.text
  caplog.clear()
  client('https://10.1.2.3/v1', api_key='sk-secret')
  client('http://[::1]:8000', api_key='sk-secret')
  client('http://10.1.2.3:8000/v1')
  assert 'plain http' not in caplog.text


@pytest.mark.parametrize('body,message', [
    (completion(None), 'a choices\\[\\].text that is not text'),
    (b'[' * 100_000 + b']' * 100_000, 'not JSON \\(RecursionError\\)'),
    (b'<html>busy</html>', 'not JSON \\(JSONDecodeError\\)'),
    (b'{"choices": 3}', 'unexpected reply'),
])
def test_bad_replies_are_retried_then_one_error_line(body, message):
  with hostile_server(lambda h, _: reply(h, 200, body)) as (url, log):
    with pytest.raises(ServerAnswerError, match=f'{message}.*attempt 2 of 2') as error:
      client(url, max_attempts=2).complete(['x =>'], [1], seed=0)
  assert len(log) == 2 and '\n' not in str(error.value)


def test_a_slow_drip_server_meets_the_deadline_per_request():
  """A byte every 0.1 s, in the headers or in the body: urllib's timeout (per read) never
  fires; the deadline per request does."""
  def drip_body(handler, stop):
    handler.send_response(200)
    handler.send_header('Content-Length', '100000')
    handler.end_headers()
    while not stop.wait(0.1):
      handler.wfile.write(b' ')
      handler.wfile.flush()

  def drip_headers(handler, stop):
    handler.wfile.write(b'HTTP/1.1 200 OK\r\n')
    while not stop.wait(0.1):
      handler.wfile.write(b'X-Slow: a\r\n')
      handler.wfile.flush()

  for behaviour in (drip_body, drip_headers):
    with hostile_server(behaviour) as (url, log):
      start = time.monotonic()
      with pytest.raises(GenerationError, match='no complete answer within 0.6 s, 2 attempts'):
        client(url, timeout=0.6, max_attempts=2).complete(['x =>'], [1], seed=0)
      assert time.monotonic() - start < 3 and len(log) == 2


def test_an_unbounded_body_is_cut_at_the_size_cap():
  def flood(handler, stop):
    handler.send_response(200)
    handler.send_header('Content-Length', str(1 << 30))
    handler.end_headers()
    chunk = b'0' * (1 << 16)
    while not stop.is_set():
      handler.wfile.write(chunk)

  with hostile_server(flood) as (url, log):
    with pytest.raises(ServerAnswerError, match='more than 1048576 bytes.*attempt 1 of 1'):
      client(url, max_attempts=1, max_reply_bytes=1 << 20).complete(['x =>'], [1], seed=0)


def test_retry_after_is_honoured():
  def busy_once(handler, _):
    if len(calls) == 0:
      calls.append(time.monotonic())
      reply(handler, 429, b'slow down', **{'Retry-After': '1'})
    else:
      calls.append(time.monotonic())
      reply(handler, 200, completion(' fine'))

  calls = []
  with hostile_server(busy_once) as (url, _):
    assert client(url).complete(['x =>'], [1], seed=0) == [[' fine']]
  assert calls[1] - calls[0] >= 1.0              # backoff alone would be 0.001 s
  with hostile_server(lambda h, _: reply(h, 503, b'', **{'Retry-After': '86400'})) as (url, log):
    with pytest.raises(ServerAnswerError, match='asks to retry after 86400 s'):
      client(url).complete(['x =>'], [1], seed=0)
    assert len(log) == 1
