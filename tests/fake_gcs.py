"""A Cloud Storage server on 127.0.0.1 for tests: the JSON API subset that gcsfs (hence
etils.epath), TensorStore (orbax's arrays) and array_record's reader use, over objects in memory.

    with FakeGcs() as gcs:                  # sets the clients' emulator variables, then restores
      ...  'gs://fake-bucket/run' ...       # any bucket name exists

It keeps what makes GCS unlike a disk: there are only whole objects (an upload becomes visible
complete, or not at all), no directories (a "folder" is a name prefix) and no rename (gcsfs
moves by copy + delete, object by object). Generation preconditions (`ifGenerationMatch`,
`ifGenerationNotMatch`) hold as TensorStore needs them. Every request is counted per method in
`requests`, so a test can say what a client did.
"""

from __future__ import annotations

import collections
import http.server
import json
import os
import re
import threading
import time
import urllib.parse
import uuid

ENV = ('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL',
       'CLOUD_STORAGE_EMULATOR_ENDPOINT', 'FSSPEC_GS_TOKEN', 'FSSPEC_GCS_TOKEN', 'GCE_METADATA_HOST',
       'GCE_METADATA_IP')


class FakeGcs:
  """The server (a thread of this process: child processes reach it through the variables)."""

  def __init__(self):
    self.objects: dict[tuple[str, str], tuple[bytes, int, float]] = {}
    self.uploads: dict[str, tuple[str, str, bytearray]] = {}
    self.requests: collections.Counter = collections.Counter()
    self.lock = threading.Lock()
    self._generation = 0
    handler = type('Handler', (_Handler,), {'gcs': self})
    self._server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    self._server.daemon_threads = True
    self.url = f'http://127.0.0.1:{self._server.server_port}'
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._saved_env: dict[str, str | None] = {}

  def __enter__(self) -> FakeGcs:
    self._thread.start()
    self._saved_env = {k: os.environ.get(k) for k in ENV}
    os.environ.update({'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false',  # No gRPC bucket probes.
                       'STORAGE_EMULATOR_HOST': self.url, 'TENSORSTORE_GCS_HTTP_URL': self.url,
                       'CLOUD_STORAGE_EMULATOR_ENDPOINT': self.url, 'FSSPEC_GS_TOKEN': 'anon',
                       'FSSPEC_GCS_TOKEN': 'anon',
                       # No metadata server: credential look-ups fail at once.
                       'GCE_METADATA_HOST': '127.0.0.1:9', 'GCE_METADATA_IP': '127.0.0.1:9'})
    _forget_cached_filesystems()
    _plain_gcsfs()
    return self

  def __exit__(self, *exc) -> None:
    for k, v in self._saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    _forget_cached_filesystems()
    self._server.shutdown()
    self._server.server_close()

  # -- the store -------------------------------------------------------------------------------
  def put(self, bucket: str, name: str, data: bytes) -> dict:
    with self.lock:
      self._generation += 1
      self.objects[bucket, name] = (bytes(data), self._generation, time.time())
      return self.meta(bucket, name)

  def meta(self, bucket: str, name: str) -> dict:
    data, generation, updated = self.objects[bucket, name]
    stamp = time.strftime('%Y-%m-%dT%H:%M:%S', time.gmtime(updated)) + \
        f'.{int(updated % 1 * 1000):03d}Z'
    return {'kind': 'storage#object', 'bucket': bucket, 'name': name, 'size': str(len(data)),
            'generation': str(generation), 'metageneration': '1', 'updated': stamp,
            'timeCreated': stamp, 'contentType': 'application/octet-stream',
            'storageClass': 'STANDARD', 'id': f'{bucket}/{name}/{generation}'}

  def names(self, bucket: str) -> list[str]:
    """Every object name in `bucket`, sorted (what a test inspects)."""
    with self.lock:
      return sorted(n for b, n in self.objects if b == bucket)


def _part_body(section: bytes) -> bytes:
  """The payload of one multipart section: after its headers' blank line, less the line break
  before the next boundary (clients use CRLF or LF)."""
  _, payload = re.split(rb'\r?\n\r?\n', section.lstrip(b'\r\n'), maxsplit=1)
  return payload[:-2] if payload.endswith(b'\r\n') else payload[:-1]


def _plain_gcsfs() -> None:
  """gcsfs picks its bucket-probing subclass at import when GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT is
  unset; it asks a gRPC service for each bucket's type (a minute of retries here). Child
  processes see the variable; this process, if gcsfs is already imported, gets the plain class
  registered for gs:// (it stays so)."""
  try:
    import fsspec
    import gcsfs.core
  except ImportError:
    return
  for protocol in ('gs', 'gcs'):
    fsspec.register_implementation(protocol, gcsfs.core.GCSFileSystem, clobber=True)


def _forget_cached_filesystems() -> None:
  """gcsfs and epath cache a client per process; a new server needs new ones."""
  try:
    import gcsfs
    gcsfs.GCSFileSystem.clear_instance_cache()
  except ImportError:
    pass
  try:
    from etils.epath import backend
    backend.fsspec_backend._get_filesystem.cache_clear()
  except (ImportError, AttributeError):
    pass


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'
  gcs: FakeGcs

  def log_message(self, *args) -> None:
    pass

  def handle(self) -> None:
    try:
      super().handle()
    except (ConnectionResetError, BrokenPipeError):     # A client that hung up: its business.
      pass

  # -- replies ---------------------------------------------------------------------------------
  def _reply(self, status: int, body: bytes = b'', headers: dict | None = None,
             content_type: str = 'application/json') -> None:
    self.send_response(status)
    for k, v in (headers or {}).items():
      self.send_header(k, v)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    if self.command != 'HEAD':
      try:
        self.wfile.write(body)
      except (BrokenPipeError, ConnectionResetError):   # The client read what it needed.
        self.close_connection = True

  def _json(self, status: int, value: dict, headers: dict | None = None) -> None:
    self._reply(status, json.dumps(value).encode(), headers)

  def _error(self, status: int, message: str) -> None:
    self._json(status, {'error': {'code': status, 'message': message,
                                  'errors': [{'message': message}]}})

  def _body(self) -> bytes:
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      chunks = []
      while True:
        size = int(self.rfile.readline().strip().split(b';')[0], 16)
        if size == 0:
          self.rfile.readline()
          return b''.join(chunks)
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
    return self.rfile.read(int(self.headers.get('Content-Length') or 0))

  def _parse(self) -> tuple[list[str], dict[str, str]]:
    url = urllib.parse.urlsplit(self.path)
    query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
    parts = [urllib.parse.unquote(p) for p in url.path.split('/') if p]
    return parts, query

  def _precondition(self, bucket: str, name: str, query: dict) -> bool:
    """False (a 412 is sent) when ifGenerationMatch does not hold."""
    wanted = query.get('ifGenerationMatch') or self.headers.get('x-goog-if-generation-match')
    if wanted is None:
      return True
    current = self.gcs.objects.get((bucket, name))
    if (current[1] if current else 0) == int(wanted):
      return True
    self._error(412, 'Precondition Failed')
    return False

  # -- methods ---------------------------------------------------------------------------------
  def do_HEAD(self) -> None:
    self.do_GET()

  def do_GET(self) -> None:
    self.gcs.requests['GET'] += 1
    parts, query = self._parse()
    if parts[:1] == ['download']:
      parts = parts[1:]
    if parts[:3] != ['storage', 'v1', 'b'] or len(parts) < 4:
      return self._error(404, f'no such endpoint {self.path}')
    bucket = parts[3]
    if len(parts) == 4:
      return self._json(200, {'kind': 'storage#bucket', 'name': bucket, 'id': bucket,
                              'location': 'US', 'storageClass': 'STANDARD'})
    if len(parts) == 5 and parts[4] == 'o':
      return self._list(bucket, query)
    name = '/'.join(parts[5:])
    if (bucket, name) not in self.gcs.objects:
      return self._error(404, f'No such object: {bucket}/{name}')
    data, generation, _ = self.gcs.objects[bucket, name]
    if 'ifGenerationNotMatch' in query and int(query['ifGenerationNotMatch']) == generation:
      return self._reply(304, headers={'x-goog-generation': str(generation)})
    if 'ifGenerationMatch' in query and int(query['ifGenerationMatch']) != generation:
      return self._error(412, 'Precondition Failed')
    if query.get('alt') != 'media':
      return self._json(200, self.gcs.meta(bucket, name))
    headers = {'x-goog-generation': str(generation), 'x-goog-metageneration': '1',
               'x-goog-stored-content-length': str(len(data))}
    spec = self.headers.get('Range')
    if not spec:
      return self._reply(200, data, headers, 'application/octet-stream')
    total = len(data)
    if m := re.fullmatch(r'bytes=-(\d+)', spec):
      start, end = max(0, total - int(m.group(1))), total - 1
    elif m := re.fullmatch(r'bytes=(\d+)-(\d*)', spec):
      start = int(m.group(1))
      end = min(total - 1, int(m.group(2))) if m.group(2) else total - 1
    else:
      return self._error(400, f'bad Range {spec}')
    if start >= total and total:
      return self._reply(416, headers={'Content-Range': f'bytes */{total}'})
    headers['Content-Range'] = f'bytes {start}-{end}/{total}'
    self._reply(206, data[start:end + 1], headers, 'application/octet-stream')

  def _list(self, bucket: str, query: dict) -> None:
    prefix, delimiter = query.get('prefix', ''), query.get('delimiter')
    start = query.get('startOffset', '')
    items, prefixes = [], set()
    with self.gcs.lock:
      names = sorted(n for b, n in self.gcs.objects if b == bucket and n.startswith(prefix)
                     and n >= start)
      for name in names:
        rest = name[len(prefix):]
        if delimiter and delimiter in rest:
          prefixes.add(prefix + rest.split(delimiter, 1)[0] + delimiter)
        else:
          items.append(self.gcs.meta(bucket, name))
    self._json(200, {'kind': 'storage#objects', 'items': items, 'prefixes': sorted(prefixes)})

  def do_DELETE(self) -> None:
    self.gcs.requests['DELETE'] += 1
    parts, query = self._parse()
    if parts[:3] != ['storage', 'v1', 'b'] or len(parts) < 6:
      return self._error(404, f'no such endpoint {self.path}')
    bucket, name = parts[3], '/'.join(parts[5:])
    with self.gcs.lock:
      if (bucket, name) not in self.gcs.objects:
        return self._error(404, f'No such object: {bucket}/{name}')
      if not self._precondition(bucket, name, query):
        return
      del self.gcs.objects[bucket, name]
    self._reply(204)

  def do_POST(self) -> None:
    self.gcs.requests['POST'] += 1
    parts, query = self._parse()
    body = self._body()
    if 'upload_id' in query:              # gcsfs sends a resumable upload's data by POST.
      return self._resume_upload(query, body)
    if parts[:4] == ['upload', 'storage', 'v1', 'b'] and len(parts) == 6:
      return self._upload(parts[4], query, body)
    if parts[:3] == ['storage', 'v1', 'b'] and ('rewriteTo' in parts or 'copyTo' in parts):
      verb = parts.index('rewriteTo' if 'rewriteTo' in parts else 'copyTo')
      bucket, name = parts[3], '/'.join(parts[5:verb])
      target_bucket, target = parts[verb + 1], '/'.join(parts[verb + 3:])
      if (bucket, name) not in self.gcs.objects:
        return self._error(404, f'No such object: {bucket}/{name}')
      meta = self.gcs.put(target_bucket, target, self.gcs.objects[bucket, name][0])
      if parts[verb] == 'copyTo':
        return self._json(200, meta)
      return self._json(200, {'kind': 'storage#rewriteResponse', 'done': True,
                              'totalBytesRewritten': meta['size'], 'objectSize': meta['size'],
                              'resource': meta})
    if parts[:3] == ['storage', 'v1', 'b'] and parts[-1] == 'compose':
      bucket, name = parts[3], '/'.join(parts[5:-1])
      spec = json.loads(body)
      data = b''.join(self.gcs.objects[bucket, s['name']][0] for s in spec['sourceObjects'])
      return self._json(200, self.gcs.put(bucket, name, data))
    self._error(404, f'no such endpoint {self.path}')

  def _upload(self, bucket: str, query: dict, body: bytes) -> None:
    kind = query.get('uploadType', 'media')
    if kind == 'media':
      name = query['name']
      with self.gcs.lock:
        if not self._precondition(bucket, name, query):
          return
      return self._json(200, self.gcs.put(bucket, name, body))
    if kind == 'multipart':
      boundary = re.search(r'boundary="?([^";]+)"?', self.headers['Content-Type']).group(1)
      payloads = [_part_body(s) for s in body.split(b'--' + boundary.encode())[1:-1]]
      meta = json.loads(payloads[0])
      name = meta.get('name') or query['name']
      with self.gcs.lock:
        if not self._precondition(bucket, name, query):
          return
      return self._json(200, self.gcs.put(bucket, name, payloads[1]))
    if kind == 'resumable':
      meta = json.loads(body) if body.strip() else {}
      name = meta.get('name') or query['name']
      upload_id = uuid.uuid4().hex
      self.gcs.uploads[upload_id] = (bucket, name, bytearray())
      location = (f'{self.gcs.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable'
                  f'&upload_id={upload_id}')
      return self._json(200, {}, {'Location': location, 'X-GUploader-UploadID': upload_id})
    self._error(400, f'uploadType={kind} is not supported')

  def do_PUT(self) -> None:
    self.gcs.requests['PUT'] += 1
    _, query = self._parse()
    self._resume_upload(query, self._body())

  def _resume_upload(self, query: dict, body: bytes) -> None:
    upload = self.gcs.uploads.get(query.get('upload_id', ''))
    if upload is None:
      return self._error(404, 'no such upload')
    bucket, name, received = upload
    spec = self.headers.get('Content-Range', '')
    m = re.fullmatch(r'bytes (\*|(\d+)-(\d+))/(\*|\d+)', spec.strip())
    if m is None and spec:
      return self._error(400, f'bad Content-Range {spec}')
    if m and m.group(2) is not None:
      del received[int(m.group(2)):]
    received.extend(body)
    total = m.group(4) if m else str(len(received))
    if total == '*' or int(total) > len(received):
      headers = {'Range': f'bytes=0-{len(received) - 1}'} if received else {}
      return self._reply(308, headers=headers)
    del self.gcs.uploads[query['upload_id']]
    self._json(200, self.gcs.put(bucket, name, bytes(received)))
