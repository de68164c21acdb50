r"""Class texts for CLAVER's text branch: templates plus interpretive prompts -> [A, C, 77] tokens.

A prompt set is a JSON file mapping each class name, exactly as the dataset spells it, to its
interpretive prompts in three aspects:

    {"abseiling": {"decomposition": ["...", ...], "synonyms": [...], "body_parts": [...]}, ...}

`prompt_tokens` turns a class list into A text variants per class, aligned so that variant a has
the same kind for every class, the paper's text set: the bare class name first ("apply eye
makeup"), then the templates ("a video of a person {}."), then the decomposition, synonym and
body-part texts. Each aspect gets as many variants as the class with the most texts in it; a
class with fewer cycles its own.

    >>> tok = load_tokenizer('bpe_simple_vocab_16e6.txt.gz')
    >>> out = prompt_tokens(class_names, tok, load_prompt_set('kinetics400'))
    >>> out.tokens.shape, out.kinds[0], out.kinds[1], out.kinds[-1]
    ((A, C, 77), 'name', 'template', 'body_parts')'

Shipped sets (`claver_jax/text/interpretive/*.json`) are found by name; check one against a
labels CSV (`id,name`) with

    python -m claver_jax.text.prompts --check=kinetics400 --labels=kinetics_400_labels.csv \
        [--tokenizer=bpe_simple_vocab_16e6.txt.gz]

which prints how the set was written, then coverage, per-aspect counts, texts over 77 tokens and
texts that name another class. Without --check it prints how every shipped set was written
(claver_jax/text/interpretive/provenance.json): not by LLaMA-3 as the paper's, but by the LLM
coding agents that develop this project.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import itertools
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from claver_jax.data.labels import read_labels
from claver_jax.text.tokenizer import Tokenizer

ASPECTS = ('decomposition', 'synonyms', 'body_parts')
NAME_KIND = 'name'
TEMPLATE_KIND = 'template'
SHIPPED_SETS = ('kinetics400', 'kinetics600', 'ucf101', 'hmdb51', 'synthetic_motion')

# The official CLAVER code's class-name templates, copied verbatim (github yjyddq/CLAVER,
# utils/tools.py, generate_text, commit ceb61eb; its commented-out alternatives left out). That
# list starts with the bare class name, '{}', which is `name` here (config.text.bare_name): with
# it, a class has the official 16 texts. "{}" is the class name made readable (`readable_name`).
TEMPLATES = (
    'a video of {}.',
    'a video of a person {}.',
    'a example of {}.',
    'a example of a person {}.',
    'a demonstration of {}.',
    'a demonstration of a person {}.',
    'Human action of {}.',
    '{}, an action.',
    '{} this is an action.',
    '{}, a video of action.',
    'Playing action of {}.',
    'Playing a kind of action, {}',
    'Doing a kind of action, {}',
    'Look, the human is {}',
    'Video classification of {}',
)

# Objects, not people: for the synthetic motion set. Short, so that the class name is most of
# each text (a text tower learnt from scratch starts out close to a bag of words).
OBJECT_TEMPLATES = (
    '{}.',
    'a video of {}.',
    'a shape {}.',
    'an object {}.',
    'a clip of a shape {}.',
    'something {}.',
)

TEMPLATE_SETS = {'official': TEMPLATES, 'objects': OBJECT_TEMPLATES}

PromptSet = dict[str, dict[str, list[str]]]


def resolve_templates(spec: str | Sequence[str]) -> tuple[str, ...]:
  """A shipped template set by name ('official': the official code's, the default; 'objects'),
  or the templates themselves, each with one "{}" for the class name: a sequence, or one string with
  '|' between them (as config.text.templates takes them)."""
  if isinstance(spec, str) and '{}' in spec:
    spec = spec.split('|')
  if isinstance(spec, str):
    if spec not in TEMPLATE_SETS:
      raise ValueError(f'Unknown template set {spec!r}; choose one of {sorted(TEMPLATE_SETS)} '
                       'or give the templates themselves, each with one "{}".')
    return TEMPLATE_SETS[spec]
  templates = tuple(spec)
  bad = [t for t in templates if not isinstance(t, str) or t.count('{}') != 1]
  if bad:
    raise ValueError(f'Each template needs exactly one "{{}}" for the class name; got {bad}.')
  return templates


def resolve_aspects(spec: str | Sequence[str]) -> tuple[str, ...]:
  """The interpretive-prompt aspects to use, in ASPECTS order: a subset of ASPECTS, as a
  sequence or one comma-separated string (config.text.aspects; '' for none). The paper's Table
  10 adds them one at a time: 'decomposition', then 'decomposition,synonyms', then all three."""
  names = [a.strip() for a in (spec.split(',') if isinstance(spec, str) else spec)]
  names = [a for a in names if a]
  unknown = [a for a in names if a not in ASPECTS]
  if unknown:
    raise ValueError(f'Unknown aspects {unknown}; choose any of {", ".join(ASPECTS)} (comma-'
                     "separated), or '' for none.")
  return tuple(a for a in ASPECTS if a in names)


class MissingPromptsError(ValueError):
  """Classes of the list without interpretive prompts; the message names them."""


class Collision(NamedTuple):
  """A text of `class_name` that names `other_class`, another class of the same set."""
  class_name: str
  aspect: str
  text: str
  other_class: str


@dataclasses.dataclass(frozen=True)
class PromptTokens:
  """The texts of C classes in A aligned variants.

  tokens: int32 [A, C, context_length]; kinds[a]: 'name', 'template' or the aspect of variant a;
  texts[a][c]: the text behind tokens[a, c]; num_truncated: texts cut to fit the context.
  """
  tokens: np.ndarray
  kinds: tuple[str, ...]
  texts: list[list[str]]
  num_truncated: int


def readable_name(class_name: str) -> str:
  """'ApplyEyeMakeup' -> 'apply eye makeup', 'brush_hair' -> 'brush hair': for the templates."""
  name = re.sub(r'(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])', ' ', class_name.replace('_', ' '))
  return re.sub(r'\s+', ' ', name).strip().lower()


# ------------------------------------------------------------------------------------------------
# Reading sets and class lists
# ------------------------------------------------------------------------------------------------
def parse_prompt_set(data: object, source: str = '<prompt set>') -> PromptSet:
  """Validates a decoded prompt set; returns it with every aspect present (possibly empty)."""
  if not isinstance(data, dict):
    raise ValueError(f'{source}: a prompt set is a JSON object mapping class names to '
                     f'{{"decomposition": [...], "synonyms": [...], "body_parts": [...]}}, '
                     f'not {type(data).__name__}.')
  out: PromptSet = {}
  for name, entry in data.items():
    if not isinstance(entry, dict):
      raise ValueError(f'{source}: class {name!r} maps to {type(entry).__name__}; expected an '
                       f'object with the keys {list(ASPECTS)}.')
    unknown = sorted(set(entry) - set(ASPECTS))
    if unknown:
      raise ValueError(f'{source}: class {name!r} has unknown keys {unknown}; the aspects are '
                       f'{list(ASPECTS)}.')
    out[name] = {}
    for aspect in ASPECTS:
      texts = entry.get(aspect, [])
      if not isinstance(texts, list) or not all(isinstance(t, str) and t.strip() for t in texts):
        raise ValueError(f'{source}: class {name!r}, {aspect!r} must be a list of non-empty '
                         f'strings; got {texts!r:.200}.')
      out[name][aspect] = [t.strip() for t in texts]
  return out


def read_prompt_set(path: str | os.PathLike) -> PromptSet:
  """A prompt-set JSON file -> {class name: {aspect: [texts]}}, validated."""
  path = Path(path)

  def unique_keys(pairs):
    seen = set()
    for key, _ in pairs:
      if key in seen:
        raise ValueError(f'{path}: the key {key!r} appears twice; merge its texts into one '
                         'entry.')
      seen.add(key)
    return dict(pairs)

  try:
    data = json.loads(path.read_text(encoding='utf-8'), object_pairs_hook=unique_keys)
  except json.JSONDecodeError as e:
    raise ValueError(f'{path}:{e.lineno}:{e.colno}: not valid JSON: {e.msg}.') from e
  return parse_prompt_set(data, str(path))


PROVENANCE_FILE = 'provenance.json'      # Beside the sets: how each was written.


def available_sets() -> list[str]:
  """Names of the prompt sets shipped in claver_jax/text/interpretive/."""
  directory = importlib.resources.files('claver_jax.text') / 'interpretive'
  if not directory.is_dir():
    return []
  return sorted(p.name[:-len('.json')] for p in directory.iterdir()
                if p.name.endswith('.json') and p.name != PROVENANCE_FILE)


def shipped_set_path(name: str) -> Path:
  """The file of a shipped set ('kinetics400', 'ucf101', ...)."""
  resource = importlib.resources.files('claver_jax.text') / 'interpretive' / f'{name}.json'
  if not resource.is_file() or resource.name == PROVENANCE_FILE:
    raise FileNotFoundError(f'No shipped prompt set {name!r}; shipped: {available_sets()}. Pass '
                            'a path to a prompt-set JSON file for others.')
  return Path(str(resource))


def provenance() -> dict:
  """claver_jax/text/interpretive/provenance.json: how the shipped sets were written ('shipped':
  who, model, sampling, when; 'sets': {name: counts, notes}) and how the paper's were ('paper')."""
  resource = importlib.resources.files('claver_jax.text') / 'interpretive' / PROVENANCE_FILE
  return json.loads(resource.read_text(encoding='utf-8'))


def provenance_report(names: Sequence[str] | None = None) -> str:
  """How shipped sets (default: all) were written, as `python -m claver_jax.text.prompts`
  prints it."""
  record = provenance()
  names = list(record['sets']) if names is None else list(names)
  lines = [record['about'], 'The shipped sets:']
  lines += [f'  {key}: {value}' for key, value in record['shipped'].items()]
  for name in names:
    entry = record['sets'][name]
    note = f'; {entry["note"]}' if 'note' in entry else ''
    lines.append(f'  {name}: {entry["classes"]} classes, {entry["texts"]} texts '
                 f'({entry["per_aspect"]} per aspect and class){note}.')
  lines.append('The paper\'s: ' + record['paper'])
  return '\n'.join(lines)


def load_prompt_set(name_or_path: str | os.PathLike) -> PromptSet:
  """A shipped set by name ('kinetics400') or a prompt-set JSON file by path."""
  path = Path(name_or_path)
  if path.is_file():
    return read_prompt_set(path)
  if path.suffix == '.json' or os.sep in str(name_or_path):
    raise FileNotFoundError(f'Prompt set file {path} does not exist (shipped sets: '
                            f'{available_sets()}).')
  return read_prompt_set(shipped_set_path(str(name_or_path)))


def match_names(class_names: Sequence[str], prompt_set: PromptSet) -> list[str | None]:
  """The key of each class in `prompt_set`: its exact name, else the one key with the same
  readable form ('ride_bike' finds 'ride bike', 'ApplyEyeMakeup' 'apply eye makeup'); None when
  there is neither."""
  by_form: dict[str, list[str]] = {}
  for key in prompt_set:
    by_form.setdefault(readable_name(key), []).append(key)
  keys = []
  for c in class_names:
    found = by_form.get(readable_name(c), [])
    keys.append(c if c in prompt_set else found[0] if len(found) == 1 else None)
  return keys


def close_matches(name: str, candidates: Sequence[str], n: int = 3) -> list[str]:
  """Names in `candidates` that look like `name`, ignoring case, spaces and punctuation."""
  def key(s):
    return re.sub(r'[^a-z0-9]', '', s.lower())
  by_key = {}
  for c in candidates:
    by_key.setdefault(key(c), c)
  found = difflib.get_close_matches(key(name), list(by_key), n=n, cutoff=0.6)
  return [by_key[k] for k in found]


# ------------------------------------------------------------------------------------------------
# Texts and tokens
# ------------------------------------------------------------------------------------------------
def _missing_message(missing: Mapping[str, list[str]], found: Mapping[str, str | None],
                     prompt_set: PromptSet) -> str:
  lines = []
  for name, aspects in itertools.islice(missing.items(), 20):
    if found[name] is not None:
      lines.append(f'  {name!r}: no texts for {aspects}')
    else:
      suggestions = close_matches(name, list(prompt_set))
      hint = f' (close: {suggestions})' if suggestions else ''
      lines.append(f'  {name!r}: not in the prompt set{hint}')
  more = f'\n  ... and {len(missing) - 20} more' if len(missing) > 20 else ''
  return '\n'.join(lines) + more


def build_prompt_texts(class_names: Sequence[str], prompt_set: PromptSet | None = None, *,
                       templates: Sequence[str] = TEMPLATES, aspects: Sequence[str] = ASPECTS,
                       allow_missing: bool = False, name: bool = True
                       ) -> tuple[list[list[str]], tuple[str, ...]]:
  """Texts [A][C] and kinds [A] for `class_names` (see the module docstring). `name`: the bare
  (readable) class name is variant 0, unless a template is "{}" already.

  Class names are looked up exactly, else by their readable form (`match_names`). A class
  without texts in an aspect is an error naming it, unless `allow_missing`: then its slots of that
  aspect take its template texts, with a warning.
  """
  if not class_names:
    raise ValueError('No class names given.')
  if not name and not templates and not (prompt_set and aspects):
    raise ValueError('No names, templates or interpretive prompts: there would be no texts.')
  bad = [t for t in templates if t.count('{}') != 1]
  if bad:
    raise ValueError(f'Each template needs exactly one "{{}}" for the class name; got {bad}.')
  unknown = sorted(set(aspects) - set(ASPECTS))
  if unknown:
    raise ValueError(f'Unknown aspects {unknown}; choose from {list(ASPECTS)}.')
  names = [readable_name(c) for c in class_names]
  texts = [[t.format(n) for n in names] for t in templates]
  kinds = [TEMPLATE_KIND] * len(templates)
  if name and '{}' not in templates:
    texts, kinds = [names, *texts], [NAME_KIND, *kinds]
  if prompt_set is None:
    return texts, tuple(kinds)

  keys = match_names(class_names, prompt_set)
  own = [prompt_set[k] if k is not None else {} for k in keys]
  missing: dict[str, list[str]] = {}
  for c, entry in zip(class_names, own):
    empty = [a for a in aspects if not entry.get(a)]
    if empty:
      missing[c] = empty
  if missing:
    message = (f'{len(missing)} of {len(class_names)} classes have no interpretive prompts:\n'
               + _missing_message(missing, dict(zip(class_names, keys)), prompt_set))
    if not allow_missing:
      raise MissingPromptsError(
          message + '\nFix the names (as the prompt set spells them, or their readable form), '
          'add texts for them, or let them fall back to their template texts with '
          "--config.text.allow_missing=True; --config.text.prompts='' uses templates only (in "
          "zero-shot: --config.zeroshot.DATASET.prompts='').")
    if not texts:
      raise ValueError(message + '\nThe fallback needs names or templates, and there are none.')
    logging.warning('%s\nThey fall back to their template texts.', message)

  fallback = [[row[c] for row in texts] for c in range(len(class_names))]
  for aspect in aspects:
    pools = [entry.get(aspect) or fallback[c] for c, entry in enumerate(own)]
    for i in range(max(len(entry.get(aspect, [])) for entry in own)):
      texts.append([pool[i % len(pool)] for pool in pools])
      kinds.append(aspect)
  return texts, tuple(kinds)


def prompt_tokens(class_names: Sequence[str], tokenizer: Tokenizer,
                  prompt_set: PromptSet | str | os.PathLike | None = None, *,
                  templates: Sequence[str] = TEMPLATES, aspects: Sequence[str] = ASPECTS,
                  allow_missing: bool = False, name: bool = True,
                  context_length: int = 77) -> PromptTokens:
  """int32 [A, C, context_length] tokens of `class_names`, with kinds and texts (`name`: the bare
  class name as variant 0, see build_prompt_texts).

  prompt_set: a loaded set, a shipped set's name, a JSON path, or None for templates only. Texts
  longer than the context are cut, keep their end-of-text token, and are counted in a warning.
  """
  if prompt_set is not None and not isinstance(prompt_set, dict):
    prompt_set = load_prompt_set(prompt_set)
  texts, kinds = build_prompt_texts(class_names, prompt_set, templates=templates,
                                    aspects=aspects, allow_missing=allow_missing, name=name)
  flat = [t for row in texts for t in row]
  unique = list(dict.fromkeys(flat))
  num_truncated = tokenizer.num_truncated(unique, context_length)
  if num_truncated:
    logging.warning('%d of %d distinct class texts are longer than %d tokens and were cut '
                    '(end-of-text kept); `python -m claver_jax.text.prompts --check` lists them.',
                    num_truncated, len(unique), context_length)
  rows = tokenizer(unique, context_length)
  index = {t: i for i, t in enumerate(unique)}
  tokens = rows[[index[t] for t in flat]].reshape(len(texts), len(class_names), context_length)
  return PromptTokens(tokens=tokens, kinds=kinds, texts=texts, num_truncated=num_truncated)


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------
def _name_pattern(name: str) -> re.Pattern:
  return re.compile(r'(?<!\w)' + re.escape(name) + r'(?!\w)', re.IGNORECASE)


def find_collisions(prompt_set: PromptSet,
                    class_names: Sequence[str] | None = None) -> list[Collision]:
  """Texts that name another class of the same dataset, word-bounded and ignoring case.

  class_names: the dataset's classes (default: the set's own). A class is matched by its name
  and by its readable form ('ApplyLipstick' also as 'apply lipstick'); occurrences inside the
  text's own class name do not count.
  """
  names = list(class_names) if class_names is not None else list(prompt_set)
  forms = {c: list(dict.fromkeys([c.lower(), readable_name(c)])) for c in names}
  by_first_word: dict[str, list[tuple[str, re.Pattern]]] = {}
  for c, c_forms in forms.items():
    for form in c_forms:
      words = re.findall(r'\w+', form)
      if words:
        by_first_word.setdefault(words[0], []).append((c, _name_pattern(form)))
  own_patterns = {c: [_name_pattern(f) for f in forms.get(c, [c.lower(), readable_name(c)])]
                  for c in prompt_set}
  collisions = []
  for c, entry in prompt_set.items():
    for aspect in ASPECTS:
      for text in entry.get(aspect, []):
        masked = text
        for pattern in own_patterns[c]:
          masked = pattern.sub(' ', masked)
        found = []
        for word in set(re.findall(r'\w+', masked.lower())):
          for other, pattern in by_first_word.get(word, []):
            if other != c and other not in found and pattern.search(masked):
              found.append(other)
        collisions.extend(Collision(c, aspect, text, o) for o in sorted(found))
  return collisions


def check_report(prompt_set: PromptSet, class_names: Sequence[str] | None = None,
                 tokenizer: Tokenizer | None = None, context_length: int = 77) -> tuple[str, bool]:
  """A readable report on a set: coverage, per-aspect counts, over-length texts, collisions.

  Returns (report, ok); ok is False when classes are missing or texts are over-length.
  """
  lines, ok = [], True
  names = list(class_names) if class_names is not None else list(prompt_set)
  keys = match_names(names, prompt_set)
  entries = {c: prompt_set[k] for c, k in zip(names, keys) if k is not None}
  if class_names is not None:
    missing = [c for c in names if c not in entries]
    extra = [c for c in prompt_set if c not in set(keys)]
    lines.append(f'coverage: {len(names) - len(missing)}/{len(names)} classes of the labels '
                 f'have texts; {len(extra)} classes of the set are not in the labels')
    for c in missing:
      suggestions = close_matches(c, extra)
      lines.append(f'  missing: {c!r}' + (f' (close: {suggestions})' if suggestions else ''))
    for c in extra:
      lines.append(f'  extra: {c!r}')
    ok &= not missing
  lines.append('texts per class:')
  for aspect in ASPECTS:
    counts = [len(entry[aspect]) for entry in entries.values()]
    if counts:
      lines.append(f'  {aspect:<14} min {min(counts)}, max {max(counts)}, total {sum(counts)}')
  empty = [(c, a) for c, entry in entries.items() for a in ASPECTS if not entry[a]]
  for c, a in empty:
    lines.append(f'  empty: {c!r} has no {a} texts')
  ok &= not empty
  if tokenizer is None:
    lines.append('over-length: not checked (pass --tokenizer=bpe_simple_vocab_16e6.txt.gz)')
  else:
    texts = [(c, a, t) for c, entry in entries.items() for a in ASPECTS for t in entry[a]]
    lengths = [len(ids) + 2 for ids in tokenizer.encode([t for _, _, t in texts])]
    over = [(e, n) for e, n in zip(texts, lengths) if n > context_length]
    lines.append(f'over-length: {len(over)} of {len(texts)} texts exceed {context_length} '
                 f'tokens (longest {max(lengths, default=0)})')
    lines.extend(f'  {n} tokens: {c!r} {a}: {t}' for (c, a, t), n in over)
    ok &= not over
  collisions = find_collisions(entries, names)
  lines.append(f'collisions: {len(collisions)} texts name another class')
  lines.extend(f'  {c!r} {a} names {o!r}: {t}' for c, a, t, o in collisions)
  return '\n'.join(lines), ok


def main(argv: list[str]) -> None:
  from absl import flags
  del argv
  f = flags.FLAGS
  if not f.check:
    print(provenance_report())
    return
  try:
    prompt_set = load_prompt_set(f.check)
    class_names = read_labels(f.labels) if f.labels else None
    tokenizer = None
    if f.tokenizer:
      from claver_jax.text.tokenizer import load_tokenizer
      tokenizer = load_tokenizer(f.tokenizer)
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f'error: {e}')
  if f.check in provenance()['sets']:
    print(provenance_report([f.check]), end='\n\n')
  report, ok = check_report(prompt_set, class_names, tokenizer)
  print(report)
  if not ok:
    sys.exit(1)


def define_flags() -> None:
  from absl import flags
  flags.DEFINE_string('check', None, "A shipped set's name (e.g. kinetics400) or a prompt-set "
                      'JSON path; without it, how the shipped sets were written is printed.')
  flags.DEFINE_string('labels', None, 'Labels CSV (id,name) to check coverage against.')
  flags.DEFINE_string('tokenizer', None, "CLIP tokenizer (OpenAI's bpe_simple_vocab_16e6.txt.gz "
                      'or a directory) to find texts over 77 tokens.')


if __name__ == '__main__':
  from absl import app
  define_flags()
  app.run(main)
