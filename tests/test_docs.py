"""Every command in the docs resolves, in code blocks and in the prose's `python -m ...` code
spans: its module and flags exist, its config and preset load, its config overrides name real
keys with values of their type, and a run's config passes the start-up checks; every
`from X import Y` in a Python block imports; every relative link names a file and, after '#',
one of its headings. The docs are every Markdown file of the repository (README.md,
configs/README.md, launch/README.md, docs/...). Placeholders in capitals (configs/NAME.py,
--config.KEY=VALUE) or '...' mark templates, which are skipped; optional parts in brackets
([--top_k=5]) are checked like the rest."""

from __future__ import annotations

import ast
import configparser
import importlib
import re
import shlex
from pathlib import Path

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO

DOCS = sorted(p for p in REPO.rglob('*.md')
              if not any(part.startswith('.') or 'venv' in part or part == 'node_modules'
                         for part in p.relative_to(REPO).parts))
PLACEHOLDER = re.compile(r'\b[A-Z][A-Z_]{1,}\b')
MAIN_FLAGS = {'config', 'workdir', 'coordinator_address', 'num_processes', 'process_id'}
ABSL_FLAGS = {'help', 'helpfull', 'helpshort', 'verbosity', 'v', 'logtostderr', 'flagfile'}
OWN_PACKAGES = ('claver_jax', 'convert', 'benchmarks')
SKIPPED = ('pytest', 'gcloud', 'bash', 'cd', 'time', 'export', 'tar', 'tmux', 'sbatch', 'srun')


def code_blocks(path: Path) -> list[tuple[str, int, str]]:
  """(language, first line number, text) of each fenced block, and of each indented block
  (4 spaces, after a blank line, outside lists) as 'shell'."""
  lines = path.read_text().splitlines()
  blocks, i = [], 0
  while i < len(lines):
    fence = re.match(r'^(\s*)```(\w*)', lines[i])
    if fence:
      indent, language, start = len(fence.group(1)), fence.group(2) or 'text', i + 1
      i += 1
      body = []
      while i < len(lines) and not lines[i].strip().startswith('```'):
        body.append(lines[i][indent:])
        i += 1
      text = '\n'.join(body)
      if language == 'text' and re.match(r'^(python |launch/|pip )', text):
        language = 'shell'                        # An unlabelled block of commands.
      blocks.append((language, start + 1, text))
    elif (lines[i].startswith('    ') and i and not lines[i - 1].strip()
          and re.match(r'^    (python |launch/|pip )', lines[i])):
      start, body = i, []
      while i < len(lines) and (lines[i].startswith('    ') or not lines[i].strip()):
        body.append(lines[i][4:])
        i += 1
      blocks.append(('shell', start + 1, '\n'.join(body).strip()))
      continue
    i += 1
  return blocks


def shell_commands(text: str) -> list[str]:
  """The commands of a shell block: continuation lines joined, comments dropped, split at &&."""
  joined = re.sub(r'\\\n\s*', ' ', text)
  commands = []
  for line in joined.splitlines():
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    commands += [part.strip() for part in line.split('&&') if part.strip()]
  return commands


def unbracket(command: str) -> str:
  """Optional parts: '[--top_k=5]' -> '--top_k=5'; '[--config.KEY=VALUE ...]' and '[prose]' are
  dropped; brackets inside a word (.[test], NAME.py[:PRESET]) stay."""
  def optional(match):
    inner = match.group(1)
    words = inner.split()
    if '...' in inner or not words or not all(w.startswith('-') for w in words):
      return ''
    return inner
  return re.sub(r'(?<![\w.])\[([^\[\]]*)\]', optional, command)


def defined_flags(module: str) -> set[str]:
  """The absl flags a module defines (read from its source, where __main__ blocks define them),
  and those of the modules whose key flags it adopts (the converters adopt convert.common's)."""
  source = (REPO / (module.replace('.', '/') + '.py')).read_text()
  names = set(re.findall(r"DEFINE_\w+\(\s*'(\w+)'", source))
  for adopted in re.findall(r'adopt_module_key_flags\((\w+)\)', source):
    package = re.search(rf'^from ([\w.]+) import {adopted}$', source, re.M).group(1)
    names |= defined_flags(f'{package}.{adopted}')
  return names


def flag_names(args: list[str]) -> list[str]:
  return [a[2:].split('=', 1)[0] for a in args if a.startswith('--')]


def check_main_args(args: list[str], where: str, run_checks: bool = True) -> None:
  """claver_jax.main's arguments: its own flags, and a config that parses with its overrides
  and (for a run, not for the tools that only compile it) passes check_config."""
  unknown = [n for n in flag_names(args) if n.split('.')[0] not in MAIN_FLAGS | ABSL_FLAGS]
  assert not unknown, f'{where}: main has no flags {unknown}'
  config_args = [a for a in args if a.startswith('--config')]
  spec = next((a.split('=', 1)[1] for a in config_args if a.startswith('--config=')), None)
  assert spec is not None, f'{where}: no --config'
  if (PLACEHOLDER.search(spec) or '...' in spec
      or any(PLACEHOLDER.search(a.split('=')[0]) for a in config_args)):
    return                                          # A template: configs/NAME.py, --config.KEY
  assert Path(REPO / spec.partition(':')[0]).is_file(), f'{where}: no config file {spec}'
  values = flags.FlagValues()
  try:
    config_flags.DEFINE_config_file('config', None, '', flag_values=values, lock_config=True,
                                    sys_argv=['main', *config_args])
    values(['main', *config_args])
    config = values.config
    if run_checks:
      from claver_jax.run_config import check_config
      check_config(config)
  except Exception as e:  # noqa: BLE001 (any failure to resolve is the finding)
    cause = e.__context__ or e
    raise AssertionError(f'{where}: {" ".join(args)}\n  -> {type(cause).__name__}: {cause}') from e


def check_command(command: str, where: str) -> bool:
  """Checks one shell command; False when it is not one of the project's own."""
  words = shlex.split(unbracket(command))
  if re.fullmatch(r'[A-Z][A-Z0-9_]*=.*', words[0]) and len(words) == 1:
    return False                                    # A shell variable (NAME="..."), used later
  if words[:2] == ['python', '-m'] and len(words) > 2:
    module, args = words[2], words[3:]
    if module.split('.')[0] not in OWN_PACKAGES:
      return False                                  # python -m pytest, pip, ...
    if module in ('claver_jax.main', 'claver_jax.zeroshot'):   # zeroshot: main's alias
      check_main_args(args, where)
      return True
    path = REPO / module.replace('.', '/')         # benchmarks/ and convert/ are not installed:
    assert path.with_suffix('.py').is_file() or (path / '__main__.py').is_file(), (  # by path
        f'{where}: no module {module}')
    known = defined_flags(module) | ABSL_FLAGS
    unknown = [n for n in flag_names(args) if n not in known and not (
        n.startswith('no') and n[2:] in known) and not n.startswith('config.')]
    assert not unknown, f'{where}: python -m {module} has no flags {unknown}'
    if 'config' in known and any(a.startswith('--config=') for a in args):
      check_main_args([a for a in args if a.startswith('--config') or
                       a.startswith('--workdir')], where, run_checks=False)
    return True
  if words[0].startswith('launch/'):
    script = REPO / words[0]
    assert script.is_file(), f'{where}: no {words[0]}'
    options = set(re.findall(r'^\s+(--[\w-]+)(?:=\*)?\)', script.read_text(), re.M))
    args = words[1:]
    main_args = args[args.index('--') + 1:] if '--' in args else []
    own = args[:args.index('--')] if '--' in args else args
    if script.name == 'local_multiprocess.sh':
      main_args, own = own[1:], []
    unknown = [a for a in own if a.split('=')[0] not in options]
    assert not unknown, f'{where}: {words[0]} has no options {unknown}'
    if main_args and not any(PLACEHOLDER.fullmatch(a) for a in main_args):
      if not any(a.startswith('--workdir') for a in main_args):
        main_args.append('--workdir=W')            # tpu_pod.sh passes its own --workdir
      check_main_args([re.sub(r'gs://', '/gcs/', a) for a in main_args], where)
    return True
  if words[:2] == ['pip', 'install']:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / 'setup.cfg')
    for word in words[2:]:
      extras = re.match(r"^\.\[(.+)\]$", word)
      if extras:
        for extra in extras.group(1).split(','):
          assert extra in cfg['options.extras_require'], f'{where}: no extra {extra}'
    if '-c' in words:
      assert (REPO / words[words.index('-c') + 1]).is_file(), f'{where}: no constraints file'
    return True
  assert words[0] in SKIPPED or words[0].startswith(('./', 'python')), (
      f'{where}: a command this test does not know how to check: {command}')
  return False


def check_python(text: str, where: str) -> None:
  tree = ast.parse(text)
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.split('.')[0] in OWN_PACKAGES:
      module = importlib.import_module(node.module)
      missing = [a.name for a in node.names if not hasattr(module, a.name)]
      assert not missing, f'{where}: {node.module} has no {missing}'


def shown(path: Path) -> str:
  """A doc's path as messages name it: from the repository root."""
  return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else path.name


def prose_lines(path: Path) -> list[tuple[int, str]]:
  """(line number, text) of the lines outside fenced code blocks."""
  lines, fenced = [], False
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if line.strip().startswith('```'):
      fenced = not fenced
    elif not fenced:
      lines.append((number, line))
  return lines


def anchors(path: Path) -> set[str]:
  """The anchors GitHub gives the headings of a Markdown file: lower case, punctuation dropped,
  spaces to hyphens, a repeated anchor numbered (-1, -2, ...)."""
  seen: dict[str, int] = {}
  for _, line in prose_lines(path):
    heading = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
    if heading:
      slug = re.sub(r'[^\w\- ]', '', heading.group(1).strip().lower()).replace(' ', '-')
      count = seen.get(slug, 0)
      seen[slug] = count + 1
      if count:
        seen[f'{slug}-{count}'] = 1
  return set(seen)


LINK = re.compile(r'!?\[[^\]]*\]\(([^)\s]+)\)')


def broken_links(path: Path) -> list[str]:
  """Relative links (and images) of a Markdown file whose file or anchor does not exist."""
  broken = []
  for number, line in prose_lines(path):
    for target in LINK.findall(re.sub(r'`[^`]*`', '', line)):
      if re.match(r'^[a-z][a-z0-9+.-]*:', target):
        continue                                    # http:, https:, mailto:
      file, _, anchor = target.partition('#')
      linked = (path.parent / file).resolve() if file else path
      where = f'{shown(path)}:{number}: {target}'
      if not linked.exists():
        broken.append(f'{where} (no such file)')
      elif anchor and (linked.suffix != '.md' or anchor not in anchors(linked)):
        broken.append(f'{where} (no such heading)')
  return broken


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
  """Each relative link of the docs names a file of the repository and, after '#', one of its
  headings."""
  assert not broken_links(doc), '\n'.join(broken_links(doc))


def test_the_readme_links_every_docs_page():
  readme = (REPO / 'README.md').read_text()
  unlinked = [p.name for p in sorted((REPO / 'docs').glob('*.md')) if f'](docs/{p.name}' not in readme]
  assert not unlinked, f'docs pages the README does not link: {unlinked}'


def test_the_link_checker_finds_what_broke(tmp_path):
  """A missing file, a missing heading and a missing heading of another page are found; links
  to existing headings (punctuation dropped, repeats numbered), files and URLs are not."""
  (tmp_path / 'other.md').write_text('# Other\n\n## The step\'s FLOPs (B/16)\n')
  page = tmp_path / 'page.md'
  page.write_text('# Page\n\n## Run\n\n## Run\n\n```bash\n# Not a heading\n```\n'
                  '[a](other.md#the-steps-flops-b16) [b](#run-1) [c](https://x.org/#y) '
                  '[d](other.md) `[e](nowhere.md)`\n'
                  '[f](missing.md) [g](#not-a-heading) [h](other.md#other-1)\n')
  found = broken_links(page)
  assert [f.split(': ')[1].split()[0] for f in found] == [
      'missing.md', '#not-a-heading', 'other.md#other-1'], found


def inline_commands(path: Path) -> list[tuple[int, str]]:
  """(line number, command) of each `python -m MODULE ARGS` code span in the prose, a span that
  wraps over lines joined; a module named alone (`python -m claver_jax.main`) is no command."""
  lines = prose_lines(path)
  text = '\n'.join(line for _, line in lines)
  commands = []
  for span in re.finditer(r'`(python -m [^`]+)`', text):
    command = re.sub(r'\s+', ' ', span.group(1)).strip()
    if len(command.split()) > 3:
      commands.append((lines[text.count('\n', 0, span.start())][0], command))
  return commands


def check_doc(doc: Path) -> int:
  """Checks every command (in code blocks and in the prose's code spans) and Python block of a
  Markdown file; -> how many were checked."""
  checked = 0
  for line, command in inline_commands(doc):
    checked += check_command(command, f'{shown(doc)}:{line}')
  for language, line, text in code_blocks(doc):
    where = f'{shown(doc)}:{line}'
    if language == 'python':
      check_python(text, where)
      checked += 1
    elif language in ('bash', 'sh', 'shell'):
      checked += sum(check_command(c, where) for c in shell_commands(text))
  return checked


@pytest.mark.parametrize('doc', DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_command_in_the_docs_resolves(doc):
  checked = check_doc(doc)
  # Every `python -m` of a shell block is one of the checked commands (none slipped the parser).
  runs = sum(len(re.findall(r'(?m)^\s*python -m ', re.sub(r'\\\n\s*', ' ', text)))
             for language, _, text in code_blocks(doc) if language in ('bash', 'sh', 'shell'))
  assert checked >= runs, f'{checked} commands checked in {doc}, {runs} written'
  if doc.name == 'README.md' and doc.parent == REPO:
    assert checked >= 8, f'only {checked} commands found in {doc}'
  if doc.parent.name == 'docs' and doc.name != 'reliability.md':
    assert checked, f'no command found in {doc}'


def test_the_checker_finds_what_drifted(tmp_path):
  """The checks fail on a misspelt flag, a config key that is gone, a bad preset, a missing
  module, and a script option that does not exist."""
  cases = [
      'python -m claver_jax.main --config=configs/demo.py --workdir=/w --config.model.temporall=kmt',
      'python -m claver_jax.main --config=configs/ucf101.py:shots=3 --workdir=/w',
      'python -m claver_jax.main --config=configs/demo.py --worksdir=/w',
      'python -m claver_jax.predict --checkpoint=/m --video=v.mp4 --topk=3',
      'python -m claver_jax.nothere --x=1',
      'launch/tpu_pod.sh --name=n --zones=z -- --config=configs/demo.py',
      "pip install -e '.[tests]'",
      'python -m claver_jax.flops --config=configs/k400.py:B16,8 --config.model.temporall=kmt',
      'python -m claver_jax.memory --config=configs/k400.py:B17,8 --topology=v5e:2x4',
  ]
  for command in cases:
    with pytest.raises(AssertionError):
      check_command(command, 'case')
  assert check_command('python -m claver_jax.predict --checkpoint=/m --video=v.mp4 '
                       '--labels "a b" c [--top_k=5] [--json]', 'case')


def test_commands_in_the_prose_are_checked(tmp_path):
  """A `python -m` code span in a paragraph, wrapped over two lines, is checked as a command;
  a module named alone is not."""
  page = tmp_path / 'page.md'
  page.write_text('Run `python -m claver_jax.main` as `python -m claver_jax.flops\n'
                  '--config=configs/demo.py --textss`.\n')
  assert inline_commands(page) == [
      (1, 'python -m claver_jax.flops --config=configs/demo.py --textss')]
  with pytest.raises(AssertionError, match='page.md:1: python -m claver_jax.flops has no flags'):
    check_doc(page)
