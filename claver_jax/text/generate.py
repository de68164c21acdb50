r"""Writes interpretive prompts for a class list with any LLM, in CLAVER's few-shot shape.

    python -m claver_jax.text.generate --labels=labels.csv --out=prompts.json \
        --backend=hf --model=/models/Meta-Llama-3-8B [--per_aspect=5] [--batch_size=32]
    python -m claver_jax.text.generate --labels=labels.csv --out=prompts.json \
        --backend=openai --base_url=http://127.0.0.1:8000/v1

For each class and aspect (decomposition, synonyms, body_parts) the model completes

    <a command naming the aspect and the 77-word limit>

    playing basketball => <worked example>
    <two more worked examples>
    {action} =>

sampling with temperature 0.9 and top p 0.95, at most 77 new tokens. The first line of each
sample is kept, cleaned and de-duplicated, until every aspect has --per_aspect texts (or
--max_rounds rounds have passed). The output is a prompt set (see `claver_jax.text.prompts`),
rewritten atomically after every step, so an interrupted run resumes where it stopped when
started again with the same --out.

The defaults are the paper's (§3.3, Appendix E) and its official script's
(data_prepare/llama3/action_descriptions.py): a LLaMA-3 model (--model: meta-llama/Meta-Llama-3-8B,
the name an OpenAI-compatible server such as vLLM serves it under; the hf backend needs a local
directory), temperature 0.9, top-p 0.95, 5 texts per aspect, at most 77 new tokens. The worked
examples below are ours; the official script's are other, longer ones.

Backends: `hf` runs a local causal LM directory through transformers (needs PyTorch); `openai`
talks to any OpenAI-compatible server (vLLM, Ollama, llama.cpp) through /v1/completions, or
/v1/chat/completions with --chat, with retries and exponential backoff (Retry-After honoured),
a deadline per request (--timeout, the whole answer included) and a cap on the answer's size.
Set OPENAI_API_KEY if the server wants a key: it is never sent to another origin (a redirect
there is refused), and a warning says when it would go over plain http to another machine.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime
import email.utils
import http.client
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

from claver_jax.data.labels import read_labels
from claver_jax.fileio import atomic_write_text
from claver_jax.text.prompts import ASPECTS, PromptSet, read_prompt_set
from claver_jax.text.prompts import readable_name

MAX_WORDS = 77
TEMPERATURE = 0.9                          # The paper's (Appendix E).
TOP_P = 0.95
MAX_NEW_TOKENS = 77                        # The official script's max_gen_len.
DEFAULT_MODEL = 'meta-llama/Meta-Llama-3-8B'   # LLaMA-3, as the paper; a base model, since the
                                           # official script uses text completion.

COMMANDS = {
    'decomposition': ('Decompose each action into the simpler actions it is made of, in the '
                      'order a viewer would see them. Answer in one line of at most 77 words.'),
    'synonyms': ('Rephrase each action with synonyms: other words and phrases that mean the '
                 'same thing. Answer in one line of at most 77 words.'),
    'body_parts': ('Describe which parts of the body move during each action, and how. Answer '
                   'in one line of at most 77 words.'),
}

# Four per aspect: the first three that are not the action being asked about are shown.
EXAMPLES = {
    'decomposition': [
        ('playing basketball', 'running down the court, dribbling the ball, jumping and shooting '
         'it through the hoop'),
        ('making tea', 'boiling water in a kettle, pouring it over a tea bag in a cup, waiting, '
         'then stirring in milk'),
        ('high jump', 'sprinting a curved run-up, taking off from one foot and arching backward '
         'over the bar onto a mat'),
        ('washing dishes', 'scrubbing plates with a sponge under running water, rinsing them and '
         'stacking them on a rack'),
    ],
    'synonyms': [
        ('playing basketball', 'shooting hoops; a game of hoops on a court; a pickup basketball '
         'game'),
        ('making tea', 'brewing tea; preparing a cup of tea; steeping tea leaves in hot water'),
        ('high jump', 'jumping over a high bar; the Fosbury flop; a vertical leap over a '
         'crossbar'),
        ('washing dishes', 'doing the dishes; cleaning plates at the sink; scrubbing pots and '
         'pans'),
    ],
    'body_parts': [
        ('playing basketball', 'hands dribble and push the ball up while the legs sprint and '
         'spring off the floor'),
        ('making tea', 'one hand tilts the kettle while the other steadies the cup; the wrist '
         'turns the spoon'),
        ('high jump', 'the legs drive the take-off, the back arches over the bar and the arms '
         'swing up for lift'),
        ('washing dishes', 'both hands hold and scrub under the tap while the arms move in '
         'small circles over the sink'),
    ],
}


class GenerationError(RuntimeError):
  """A backend that cannot be used or reached; the message says why and what to do."""


class ServerAnswerError(GenerationError):
  """The server answered, with an error status or something that is not JSON."""


class Backend(Protocol):
  """Draws `n[i]` completions of `prompts[i]`."""

  def prompts_per_call(self, n: int) -> int:
    """How many prompts, with n samples each, one `complete` call handles at once."""

  def complete(self, prompts: Sequence[str], n: Sequence[int], seed: int) -> list[list[str]]:
    """For each prompt, up to n[i] completions (the text after the prompt)."""


# ------------------------------------------------------------------------------------------------
# Prompts and cleaning
# ------------------------------------------------------------------------------------------------
def few_shot_prompt(class_name: str, aspect: str) -> str:
  """The completion prompt for one class and aspect; it ends with '{action} =>'."""
  if aspect not in COMMANDS:
    raise ValueError(f'Unknown aspect {aspect!r}; choose from {list(ASPECTS)}.')
  action = readable_name(class_name)
  examples = [(a, t) for a, t in EXAMPLES[aspect] if a != action][:3]
  shots = ''.join(f'{a} => {t}\n' for a, t in examples)
  return f'{COMMANDS[aspect]}\n\n{shots}{action} =>'


def clean_completion(completion: str, class_name: str) -> str | None:
  """The first line of a completion, cleaned; None when nothing usable is left."""
  line = completion.lstrip(' \t').split('\n', 1)[0]
  line = ''.join(' ' if unicodedata.category(ch)[0] == 'C' or ch == '\ufffd' else ch
                 for ch in line)  # Control and format characters, undecodable bytes.
  line = re.sub(r'^\s*(?:\d+[.)]|[-*\u2022])\s+', '', line)
  line = re.sub(r'\s+', ' ', line).strip().strip('"\'`\u201c\u201d').strip()
  if not line or '=>' in line or not re.search(r'[^\W\d_]', line):
    return None
  line = ' '.join(line.split(' ')[:MAX_WORDS])
  if dedup_key(line) in (dedup_key(class_name), dedup_key(readable_name(class_name))):
    return None
  return line


def dedup_key(text: str) -> str:
  """Texts equal up to case, spacing and punctuation share a key."""
  return ' '.join(re.findall(r'\w+', text.lower()))


# ------------------------------------------------------------------------------------------------
# Backends
# ------------------------------------------------------------------------------------------------
def _parsed(url: str, body: bytes, parse: Callable[[bytes], Any]) -> Any:
  """parse(body), with an undecodable or too deeply nested answer a BadReplyError."""
  try:
    return parse(body)
  except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError included.
    raise BadReplyError(f'{url} answered with something that is not JSON ({type(e).__name__}): '
                        f'{body[:200]!r}') from None


class BadReplyError(ServerAnswerError):
  """An answer that is not a completion reply (not JSON, too large, no text); retried."""


class RedirectRefusedError(GenerationError):
  """The server redirected to another origin while an API key was to be sent."""


MAX_REPLY_BYTES = 16 << 20     # A completion reply is kilobytes.
MAX_RETRY_AFTER = 300.0        # Seconds: a server asking for a longer wait is an error.


def _origin(url: str) -> tuple[str, str, int | None]:
  parts = urllib.parse.urlsplit(url)
  default = {'http': 80, 'https': 443}.get(parts.scheme)
  return parts.scheme, (parts.hostname or '').lower(), parts.port or default


def is_loopback(host: str) -> bool:
  """True for localhost and loopback addresses (127.0.0.0/8, ::1)."""
  if host.lower().rstrip('.') == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host.strip('[]')).is_loopback
  except ValueError:
    return False


def retry_after_seconds(value: str | None) -> float | None:
  """An HTTP Retry-After header (seconds or an HTTP date) -> seconds to wait, or None."""
  if not value:
    return None
  value = value.strip()
  if value.isdigit():
    return float(value)
  try:
    when = email.utils.parsedate_to_datetime(value)
  except (TypeError, ValueError):
    return None
  if when.tzinfo is None:
    when = when.replace(tzinfo=datetime.timezone.utc)
  return max(0.0, (when - datetime.datetime.now(datetime.timezone.utc)).total_seconds())


class _Deadline:
  """A whole request's time limit: when it passes, the request's sockets are shut down, so that
  a read blocked on a server sending a byte now and then returns (urllib's timeout is per read)."""

  def __init__(self, seconds: float):
    self.end = time.monotonic() + seconds
    self.expired = False
    self._timers: list[threading.Timer] = []

  def watch(self, sock: socket.socket) -> None:
    timer = threading.Timer(max(0.0, self.end - time.monotonic()), self._expire, (sock,))
    timer.daemon = True
    timer.start()
    self._timers.append(timer)

  def _expire(self, sock: socket.socket) -> None:
    self.expired = True
    with contextlib.suppress(OSError):
      sock.shutdown(socket.SHUT_RDWR)

  def cancel(self) -> None:
    for timer in self._timers:
      timer.cancel()


def _watched(connection_class: type, deadline: _Deadline) -> type:
  """`connection_class` whose sockets `deadline` shuts down when it passes."""
  class Watched(connection_class):
    def connect(self):
      super().connect()
      deadline.watch(self.sock)
  return Watched


class _HTTPHandler(urllib.request.HTTPHandler):
  def __init__(self, deadline: _Deadline):
    super().__init__()
    self.deadline = deadline

  def http_open(self, req):
    return self.do_open(_watched(http.client.HTTPConnection, self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
  def __init__(self, deadline: _Deadline):
    super().__init__()
    self.deadline = deadline

  def https_open(self, req):
    return self.do_open(_watched(http.client.HTTPSConnection, self.deadline), req,
                        context=self._context)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
  """Follows redirects within the origin; refuses one to another origin (scheme, host, port)
  while an Authorization header is sent: urllib would carry the API key there."""

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    if req.has_header('Authorization') and _origin(newurl) != _origin(req.full_url):
      raise RedirectRefusedError(
          f'{req.full_url} redirected (HTTP {code}) to {newurl}, another origin: not followed, '
          'as the API key would go there. Set --base_url to the server that answers.')
    return super().redirect_request(req, fp, code, msg, headers, newurl)


class OpenAIBackend:
  """An OpenAI-compatible server: one request per prompt, `concurrency` in flight.

  Each request has `timeout` seconds in all (connecting, sending, the whole answer) and an
  answer of at most `max_reply_bytes`. HTTP 408/409/425/429/5xx, timeouts, lost connections and
  bad replies (not JSON, too large, no text) are retried up to `max_attempts` times with
  exponential backoff, waiting at least what a Retry-After header asks (more than
  MAX_RETRY_AFTER s is an error); then they are one error line. The API key is never sent to
  another origin: a redirect there is refused.
  """

  RETRY_STATUS = (408, 409, 425, 429, 500, 502, 503, 504)

  def __init__(self, base_url: str, model: str, *, chat: bool = False,
               max_new_tokens: int = MAX_NEW_TOKENS, temperature: float = TEMPERATURE,
               top_p: float = TOP_P, concurrency: int = 8,
               timeout: float = 120.0, max_attempts: int = 5, backoff: float = 1.0,
               api_key: str | None = None, max_reply_bytes: int = MAX_REPLY_BYTES):
    base_url = base_url.rstrip('/')
    self.base_url = base_url if base_url.endswith('/v1') else base_url + '/v1'
    self.model, self.chat, self.max_new_tokens = model, chat, max_new_tokens
    self.temperature, self.top_p, self.timeout = temperature, top_p, timeout
    self.max_attempts, self.backoff = max(1, max_attempts), backoff
    self.concurrency = max(1, concurrency)
    self.api_key, self.max_reply_bytes = api_key, max_reply_bytes
    scheme, host, _ = _origin(self.base_url)
    if api_key and scheme == 'http' and not is_loopback(host):
      logging.warning('The API key goes to %s over plain http, readable on the way; use https '
                      'for a server on another machine.', self.base_url)

  def _fetch(self, url: str, data: bytes | None, headers: dict[str, str]) -> bytes:
    """One request: the answer's body, within the deadline and the size cap."""
    deadline = _Deadline(self.timeout)
    opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline),
                                         _SameOriginRedirects())
    chunks, size = [], 0
    try:
      with opener.open(urllib.request.Request(url, data=data, headers=headers),
                       timeout=self.timeout) as response:
        while chunk := response.read1(1 << 16):
          size += len(chunk)
          if size > self.max_reply_bytes:
            raise BadReplyError(f'{url} answered with more than {self.max_reply_bytes} bytes, '
                                'which is no completion reply')
          chunks.append(chunk)
    except urllib.error.HTTPError as e:
      e.detail = ''                # The start of the error body, read within the deadline.
      with contextlib.suppress(OSError, http.client.HTTPException):
        e.detail = ' '.join(e.read(500).decode('utf-8', 'replace').split())
      raise
    except (OSError, http.client.HTTPException) as e:
      if deadline.expired:
        raise TimeoutError(f'no complete answer within {self.timeout:g} s') from e
      raise
    finally:
      deadline.cancel()
    if deadline.expired:
      raise TimeoutError(f'no complete answer within {self.timeout:g} s')
    return b''.join(chunks)

  def _request(self, path: str, payload: dict | None = None,
               parse: Callable[[bytes], Any] | None = json.loads) -> Any:
    """GET (payload None) or POST JSON to base_url + path, with retries; `parse(body)` of the
    answer (the body itself when parse is None), which raises BadReplyError on a bad reply."""
    url = self.base_url + path
    headers = {'Content-Type': 'application/json'}
    if self.api_key:
      headers['Authorization'] = f'Bearer {self.api_key}'
    data = None if payload is None else json.dumps(payload).encode()
    attempt = 0
    while True:
      attempt += 1
      last = attempt == self.max_attempts
      delay = self.backoff * 2 ** (attempt - 1)
      try:
        body = self._fetch(url, data, headers)
        return body if parse is None else _parsed(url, body, parse)
      except urllib.error.HTTPError as e:
        if e.code not in self.RETRY_STATUS or last:
          raise ServerAnswerError(f'{url} answered HTTP {e.code} {e.reason} (attempt {attempt}'
                                  f' of {self.max_attempts}): {e.detail}') from e
        reason = f'HTTP {e.code}'
        wait = retry_after_seconds(e.headers.get('Retry-After'))
        if wait is not None and wait > MAX_RETRY_AFTER:
          raise ServerAnswerError(f'{url} answered HTTP {e.code} and asks to retry after '
                                  f'{wait:.0f} s, more than {MAX_RETRY_AFTER:.0f} s: try again '
                                  'later.') from e
        delay = max(delay, wait or 0.0)
      except BadReplyError as e:
        if last:
          raise BadReplyError(f'{e} (attempt {attempt} of {self.max_attempts})') from e
        reason = str(e)
      except TimeoutError as e:
        reason = str(e)
        if last:
          raise GenerationError(f'{url}: {reason}, {self.max_attempts} attempts: the server is '
                                'too slow or stalled; raise --timeout or check it.') from e
      except (OSError, http.client.HTTPException) as e:   # URLError included.
        reason = getattr(e, 'reason', None) or f'{type(e).__name__}: {e}'
        if last:
          raise GenerationError(
              f'Cannot reach the OpenAI-compatible server at {self.base_url} ({reason}) after '
              f'{self.max_attempts} attempts. Start one (e.g. `vllm serve MODEL`, '
              '`ollama serve` with --base_url=http://127.0.0.1:11434/v1, or llama.cpp\'s '
              '`llama-server`) or fix --base_url.') from e
      logging.warning('%s: %s; retrying in %.2f s (attempt %d of %d).', url, reason, delay,
                      attempt + 1, self.max_attempts)
      time.sleep(delay)

  def check(self) -> None:
    """Fails early with a clear error when no server answers at base_url."""
    try:
      self._request('/models', parse=None)
    except ServerAnswerError:  # Any answer means a server is there; /models is optional.
      pass

  def prompts_per_call(self, n: int) -> int:
    del n  # Each request asks for all n samples of its prompt.
    return self.concurrency

  def _complete_one(self, prompt: str, n: int, seed: int) -> list[str]:
    common = dict(model=self.model, max_tokens=self.max_new_tokens, temperature=self.temperature,
                  top_p=self.top_p, n=n, seed=seed)
    if self.chat:
      messages = [{'role': 'system', 'content': 'Continue the list: answer with one line for '
                                                'the last action and nothing else.'},
                  {'role': 'user', 'content': prompt}]
      return self._request('/chat/completions', dict(common, messages=messages),
                           parse=self._texts)
    return self._request('/completions', dict(common, prompt=prompt, stop=['\n']),
                         parse=self._texts)

  def _texts(self, body: bytes) -> list[str]:
    """A completion reply -> its texts; BadReplyError when it has none."""
    reply = json.loads(body)
    field = 'message.content' if self.chat else 'text'
    try:
      texts = [c['message']['content'] if self.chat else c['text'] for c in reply['choices']]
    except (KeyError, TypeError) as e:
      raise BadReplyError(f'{self.base_url}: unexpected reply (no choices[].{field}): '
                          f'{json.dumps(reply)[:300]}') from e
    if not all(isinstance(t, str) for t in texts):
      raise BadReplyError(f'{self.base_url}: a choices[].{field} that is not text: '
                          f'{json.dumps(reply)[:300]}')
    return texts

  def complete(self, prompts: Sequence[str], n: Sequence[int], seed: int) -> list[list[str]]:
    with concurrent.futures.ThreadPoolExecutor(self.concurrency) as pool:
      futures = [pool.submit(self._complete_one, p, k, seed + i)
                 for i, (p, k) in enumerate(zip(prompts, n))]
      return [f.result() for f in futures]


class HFBackend:
  """A local causal LM directory through transformers (PyTorch), `batch_size` rows per pass."""

  def __init__(self, model_dir: str | os.PathLike, *, max_new_tokens: int = MAX_NEW_TOKENS,
               temperature: float = TEMPERATURE, top_p: float = TOP_P, batch_size: int = 8,
               device: str = 'auto'):
    from claver_jax.compat import require_torch
    torch = require_torch('The hf backend (or use --backend=openai with a server)',
                          GenerationError)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model_dir = Path(model_dir)
    if not (model_dir / 'config.json').is_file():
      raise GenerationError(f'--model={model_dir} is not a local model directory with '
                            'config.json: the hf backend loads local directories only (download '
                            'the model first, or use --backend=openai with a server).')
    if device == 'auto':
      device = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
      self.tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
      self.model = AutoModelForCausalLM.from_pretrained(
          model_dir, local_files_only=True,
          dtype=torch.bfloat16 if device.startswith('cuda') else torch.float32).to(device)
    except (OSError, ValueError) as e:
      raise GenerationError(f'Cannot load a causal LM and its tokenizer from {model_dir}: '
                            f'{e}') from e
    self.model.eval()
    self.tokenizer.padding_side = 'left'  # Decoder-only models generate after the prompt.
    if self.tokenizer.pad_token is None:
      self.tokenizer.pad_token = self.tokenizer.eos_token
    self.torch, self.device = torch, device
    self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
    self.batch_size = max(1, batch_size)

  def prompts_per_call(self, n: int) -> int:
    return max(1, self.batch_size // max(1, n))

  def complete(self, prompts: Sequence[str], n: Sequence[int], seed: int) -> list[list[str]]:
    rows = [(i, p) for i, (p, k) in enumerate(zip(prompts, n)) for _ in range(k)]
    out: list[list[str]] = [[] for _ in prompts]
    self.torch.manual_seed(seed)
    for start in range(0, len(rows), self.batch_size):
      chunk = rows[start:start + self.batch_size]
      inputs = self.tokenizer([p for _, p in chunk], return_tensors='pt', padding=True)
      inputs = inputs.to(self.device)
      with self.torch.no_grad():
        generated = self.model.generate(
            **inputs, do_sample=True, temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id,
            stop_strings=['\n'], tokenizer=self.tokenizer)
      new = generated[:, inputs['input_ids'].shape[1]:]
      for (i, _), text in zip(chunk, self.tokenizer.batch_decode(new, skip_special_tokens=True)):
        out[i].append(text)
    return out


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def _write(out: Path, result: PromptSet, class_names: Sequence[str]) -> None:
  known = set(class_names)
  order = [c for c in class_names if c in result] + [c for c in result if c not in known]
  text = json.dumps({c: result[c] for c in order}, indent=2, ensure_ascii=False) + '\n'
  atomic_write_text(out, text)


def _resume(out: Path, class_names: Sequence[str], overwrite: bool) -> PromptSet:
  if overwrite or not out.exists():
    return {}
  try:
    result = read_prompt_set(out)
  except ValueError as e:
    raise GenerationError(f'Cannot resume from {out}: {e} Fix or delete it, or pass '
                          '--overwrite.') from e
  extra = [c for c in result if c not in set(class_names)]
  if extra:
    logging.warning('%s has %d classes that are not in the labels (kept): %s', out, len(extra),
                    extra[:5])
  return result


def generate_prompt_set(class_names: Sequence[str], backend: Backend, out: str | os.PathLike,
                        *, per_aspect: int = 5, max_rounds: int = 4, seed: int = 0,
                        overwrite: bool = False, progress: bool = True) -> PromptSet:
  """Fills `out` with `per_aspect` texts per aspect for every class; resumes a partial `out`.

  Classes already complete in `out` are not asked again; partial ones are topped up. `out` is
  rewritten atomically after each step of classes. Returns the whole set.
  """
  from tqdm.auto import tqdm
  if per_aspect < 1:
    raise ValueError(f'per_aspect={per_aspect} must be at least 1.')
  out = Path(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  result = _resume(out, class_names, overwrite)
  todo = [c for c in class_names
          if any(len(result.get(c, {}).get(a, [])) < per_aspect for a in ASPECTS)]
  if len(todo) < len(class_names):
    print(f'Resuming {out}: {len(class_names) - len(todo)} of {len(class_names)} classes are '
          'complete.', file=sys.stderr)
  step = max(1, backend.prompts_per_call(per_aspect) // len(ASPECTS))  # Classes per step.
  position = {c: i for i, c in enumerate(class_names)}
  short = []
  with tqdm(total=len(todo), desc='classes', unit='class', disable=not progress) as bar:
    for start in range(0, len(todo), step):
      group = todo[start:start + step]
      for c in group:
        result[c] = {a: list(result.get(c, {}).get(a, [])) for a in ASPECTS}
      for round_index in range(max_rounds):
        wanted = [(c, a, per_aspect - len(result[c][a])) for c in group for a in ASPECTS
                  if len(result[c][a]) < per_aspect]
        if not wanted:
          break
        completions = backend.complete(
            [few_shot_prompt(c, a) for c, a, _ in wanted], [k for _, _, k in wanted],
            seed=seed + 1_000_003 * round_index + 1009 * position[group[0]])
        for (c, a, _), samples in zip(wanted, completions):
          seen = {dedup_key(t) for t in result[c][a]}
          for sample in samples:
            line = clean_completion(sample, c)
            if line and dedup_key(line) not in seen and len(result[c][a]) < per_aspect:
              seen.add(dedup_key(line))
              result[c][a].append(line)
      short += [(c, a, len(result[c][a])) for c in group for a in ASPECTS
                if len(result[c][a]) < per_aspect]
      _write(out, result, class_names)
      bar.update(len(group))
  if short:
    logging.warning('%d class aspects have fewer than %d texts after %d rounds (the loader '
                    'cycles them; an empty one needs texts or the template fallback): %s',
                    len(short), per_aspect, max_rounds, short[:10])
  return result


def make_backend(backend: str, model: str, *, base_url: str, chat: bool, max_new_tokens: int,
                 batch_size: int, timeout: float, max_attempts: int, backoff: float,
                 device: str, temperature: float = TEMPERATURE, top_p: float = TOP_P) -> Backend:
  """The backend named by --backend, checked to be usable."""
  if backend == 'hf':
    return HFBackend(model, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                     batch_size=batch_size, device=device)
  if backend == 'openai':
    client = OpenAIBackend(base_url, model, chat=chat, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p,
                           concurrency=batch_size, timeout=timeout, max_attempts=max_attempts,
                           backoff=backoff, api_key=os.environ.get('OPENAI_API_KEY'))
    client.check()
    return client
  raise ValueError(f'--backend={backend!r}: choose hf or openai.')


def main(argv: list[str]) -> None:
  from absl import flags
  del argv
  f = flags.FLAGS
  try:
    class_names = read_labels(f.labels)
    backend = make_backend(f.backend, f.model, base_url=f.base_url, chat=f.chat,
                           max_new_tokens=f.max_new_tokens, batch_size=f.batch_size,
                           timeout=f.timeout, max_attempts=f.max_attempts, backoff=f.backoff,
                           device=f.device, temperature=f.temperature, top_p=f.top_p)
    result = generate_prompt_set(class_names, backend, f.out, per_aspect=f.per_aspect,
                                 max_rounds=f.max_rounds, seed=f.seed, overwrite=f.overwrite)
  except (GenerationError, FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  num_texts = sum(len(t) for entry in result.values() for t in entry.values())
  print(f'Wrote {f.out}: {len(result)} classes, {num_texts} texts.')


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string('labels', None, 'Labels CSV (id,name) with the classes to describe.',
                      required=True)
  flags.DEFINE_string('out', None, 'Output prompt-set JSON; resumed when it exists.',
                      required=True)
  flags.DEFINE_enum('backend', None, ['hf', 'openai'], 'hf: local transformers model; openai: '
                    'an OpenAI-compatible server.', required=True)
  flags.DEFINE_string('model', DEFAULT_MODEL, 'hf: a local model directory; openai: the served '
                      "model name. Default: LLaMA-3, the paper's LLM.")
  flags.DEFINE_float('temperature', TEMPERATURE, "Sampling temperature (the paper's 0.9).")
  flags.DEFINE_float('top_p', TOP_P, "Nucleus sampling top-p (the paper's 0.95).")
  flags.DEFINE_string('base_url', 'http://127.0.0.1:8000/v1', 'openai: the server URL.')
  flags.DEFINE_bool('chat', False, 'openai: use /v1/chat/completions instead of /v1/completions.')
  flags.DEFINE_integer('per_aspect', 5, 'Texts per aspect per class.')
  flags.DEFINE_integer('max_rounds', 4, 'Sampling rounds per class before giving up on more '
                       'distinct texts.')
  flags.DEFINE_integer('max_new_tokens', MAX_NEW_TOKENS, 'Most tokens sampled per text (the '
                       "official script's 77).")
  flags.DEFINE_integer('batch_size', 8, 'hf: sequences per generate call; openai: requests in '
                       'flight.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_float('timeout', 120.0, 'openai: seconds per request, the whole answer included.')
  flags.DEFINE_integer('max_attempts', 5, 'openai: attempts per request (exponential backoff).')
  flags.DEFINE_float('backoff', 1.0, 'openai: first retry delay in seconds; doubles each time.')
  flags.DEFINE_string('device', 'auto', 'hf: torch device (auto: cuda when available).')
  flags.DEFINE_bool('overwrite', False, 'Start afresh instead of resuming an existing --out.')


if __name__ == '__main__':
  from absl import app
  define_flags()
  app.run(main)
