"""No import cycle anywhere in fedjax_eff (lazy imports included).

Every module is parsed with `ast` (no import runs); each `import` and
`from ... import` statement, at top level or inside a function, is an edge
to the fedjax_eff module it loads. Importing `a.b.c` also runs the
`__init__` of the packages `a.b` (and `a`) unless the importer lives inside
that package (a package's own modules import its siblings while its
`__init__` runs, which Python handles), so those edges count too: e.g.
`models/x.py` importing `techniques/federated_dropout.py` runs
`techniques/__init__.py`.
"""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = 'fedjax_eff'


def modules() -> dict[str, str]:
  """Dotted module name -> file path, for every module of the package."""
  out = {}
  for folder, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
    for f in files:
      if f.endswith('.py'):
        path = os.path.join(folder, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        out[name.removesuffix('.__init__')] = path
  return out


def _imported(node: ast.AST, package: str, known) -> set[str]:
  """The modules of `known` that one import statement loads directly."""
  if isinstance(node, ast.Import):
    return {a.name for a in node.names if a.name in known}
  base = node.module or ''
  if node.level:  # relative: from .x import y
    parts = package.split('.')[:len(package.split('.')) - node.level + 1]
    base = '.'.join(parts + ([node.module] if node.module else []))
  out = set()
  for a in node.names:
    if f'{base}.{a.name}' in known:
      out.add(f'{base}.{a.name}')  # a submodule
    elif base in known:
      out.add(base)  # a name defined in module (or package) `base`
  return out


def import_graph() -> dict[str, set[str]]:
  """Module -> the modules importing it runs first (see module doc)."""
  known = modules()
  graph = {}
  for name, path in known.items():
    with open(path) as f:
      tree = ast.parse(f.read(), path)
    package = name if path.endswith('__init__.py') else name.rpartition(
        '.')[0]
    edges = set()
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        for target in _imported(node, package, known):
          edges.add(target)
          parent = target.rpartition('.')[0]
          while parent:  # packages whose __init__ runs first
            if parent in known and not (name == parent or name.startswith(
                parent + '.')):
              edges.add(parent)
            parent = parent.rpartition('.')[0]
    edges.discard(name)
    graph[name] = edges
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One cycle `[a, b, ..., a]` of `graph`, or None (iterative DFS)."""
  state = {}  # 1: on the current path, 2: done
  for root in sorted(graph):
    if root in state:
      continue
    path, stack = [root], [iter(sorted(graph[root]))]
    state[root] = 1
    while stack:
      nxt = next(stack[-1], None)
      if nxt is None:
        state[path.pop()] = 2
        stack.pop()
      elif state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      elif nxt not in state:
        state[nxt] = 1
        path.append(nxt)
        stack.append(iter(sorted(graph.get(nxt, ()))))
  return None


def test_graph_sees_lazy_and_package_imports():
  """The parser finds imports inside functions and package `__init__`s."""
  graph = import_graph()
  assert 'fedjax_eff.experiment.train' in graph
  assert 'fedjax_eff.core.technique' in graph['fedjax_eff.techniques']
  assert find_cycle({'a': {'b'}, 'b': {'c'}, 'c': {'a'}}) == [
      'a', 'b', 'c', 'a']
  assert find_cycle({'a': {'b'}, 'b': set()}) is None


def test_no_import_cycle():
  cycle = find_cycle(import_graph())
  assert cycle is None, 'import cycle: ' + ' -> '.join(cycle)
