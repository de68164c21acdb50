"""The package's import graph (from the source, with ast: nothing is imported): no cycles, and
the model, data and text code never reaches, directly or through another module, what runs it
(train, main, evaluate, zeroshot, predict). Imports inside functions count too."""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / 'claver_jax'
# The modules that run things: nothing in models/, data/ or text/ may reach them.
RUNNERS = {'claver_jax.main', 'claver_jax.train', 'claver_jax.evaluate', 'claver_jax.zeroshot',
           'claver_jax.predict'}
# Leaf utilities that import nothing of the package but each other.
FOUNDATIONS = {'claver_jax.compat', 'claver_jax.distributed', 'claver_jax.fileio',
               'claver_jax.param_paths'}
LOWER = ('claver_jax.models', 'claver_jax.data', 'claver_jax.text')


def module_trees() -> dict[str, tuple[ast.Module, str]]:
  """'claver_jax.models.io' -> (its syntax tree, the package relative imports start from)."""
  trees = {}
  for path in PACKAGE.rglob('*.py'):
    parts = path.relative_to(REPO).with_suffix('').parts
    package = '.'.join(parts[:-1])
    name = package if parts[-1] == '__init__' else '.'.join(parts)
    trees[name] = (ast.parse(path.read_text(), str(path)), package)
  return trees


def without_main_block(tree: ast.Module) -> ast.Module:
  """The module without its `if __name__ == '__main__':` block: a script's own imports run only
  when it is the program (`python -m claver_jax.zeroshot` imports main), never on import."""
  body = [node for node in tree.body if not (
      isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
      and ast.unparse(node.test) in ("__name__ == '__main__'", '__name__ == "__main__"'))]
  return ast.Module(body=body, type_ignores=[])


def import_graph() -> dict[str, set[str]]:
  """module -> the package's modules it imports (`from claver_jax.models import io` counts as
  claver_jax.models.io; `from claver_jax.models import load` as claver_jax.models)."""
  trees = module_trees()

  def owner(name: str) -> str:
    while name not in trees:
      name = name.rpartition('.')[0]
    return name

  graph = {}
  for name, (tree, package) in trees.items():
    imported = set()
    for node in ast.walk(without_main_block(tree)):
      if isinstance(node, ast.Import):
        imported |= {owner(a.name) for a in node.names if a.name.startswith('claver_jax')}
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          parent = package.split('.')[:len(package.split('.')) - node.level + 1]
          base = '.'.join(parent + ([base] if base else []))
        if base.startswith('claver_jax'):
          imported |= {f'{base}.{a.name}' if f'{base}.{a.name}' in trees else owner(base)
                       for a in node.names}
    graph[name] = imported - {name}
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while not component or component[-1] != v:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_the_graph_sees_the_imports_it_checks():
  graph = import_graph()
  assert {'claver_jax.train', 'claver_jax.models.io', 'claver_jax.data.pipeline'} <= set(graph)
  assert 'claver_jax.models.families' in graph['claver_jax.models.io']
  assert 'claver_jax.param_paths' in graph['claver_jax.sharding']
  assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_no_import_cycles():
  assert cycles(import_graph()) == []


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
  """Every module `start` imports, directly or through others."""
  seen, todo = set(), [start]
  while todo:
    for target in graph[todo.pop()] - seen:
      seen.add(target)
      todo.append(target)
  return seen


def test_models_data_and_text_reach_nothing_that_runs_them():
  """No module of models/, data/ or text/ reaches RUNNERS; models/ imports no data/ (the data
  pipeline feeds the models, not the other way round); FOUNDATIONS stay leaves."""
  graph = import_graph()
  assert RUNNERS <= set(graph)
  upward = {f'{name} -> {sorted(reachable(graph, name) & RUNNERS)}' for name in graph
            if name.startswith(LOWER) and reachable(graph, name) & RUNNERS}
  assert upward == set()
  assert {f'{name} -> {target}' for name, targets in graph.items()
          if name.startswith('claver_jax.models') for target in targets
          if target.startswith('claver_jax.data')} == set()
  assert all(graph[name] <= FOUNDATIONS for name in FOUNDATIONS)
  assert reachable({'a': {'b'}, 'b': {'c'}, 'c': set()}, 'a') == {'b', 'c'}


def test_sharding_imports_no_model_code():
  """The families hand sharding their rules (Family.sharding_rules); it needs no model."""
  assert import_graph()['claver_jax.sharding'] <= FOUNDATIONS


def test_names_train_held_before_the_split_still_import_with_a_pointer():
  """`from claver_jax.train import make_model` (and every other name train.py held before issue
  26 split it) gives the object from its new module, with a DeprecationWarning naming it."""
  import importlib
  import warnings

  import pytest

  from claver_jax import train
  for name, module in train._MOVED.items():
    with pytest.warns(DeprecationWarning, match=rf'^claver_jax\.train\.{name} moved to {module}\.'):
      moved = getattr(train, name)
    assert moved is getattr(importlib.import_module(module), name)
  with warnings.catch_warnings():
    warnings.simplefilter('error')
    from claver_jax.train import make_train_step     # Still imported by train: no warning.
  assert make_train_step is importlib.import_module('claver_jax.step').make_train_step
  with pytest.raises(AttributeError, match="has no attribute 'make_modle'"):
    train.make_modle  # noqa: B018
