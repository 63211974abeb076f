"""The package layers, read from the source (ast, so imports inside functions count too): each
module imports only its own layer or those below it, and no import cycle exists.

  model  <-  data  <-  train (library)  <-  experiments.studies  <-  train.stages  <-  experiments  <-  run
"""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ('model', 'data', 'train', 'experiments.studies', 'train.stages', 'experiments', 'run')
PACKAGES = ('model', 'data', 'train', 'experiments')


def layer(module: str) -> int:
  """The layer with the longest name prefixing `module` (train.stages.sft -> train.stages)."""
  matches = [name for name in LAYERS if module == name or module.startswith(name + '.')]
  return LAYERS.index(max(matches, key=len))


def modules() -> dict[str, str]:
  """Every project module name -> its file."""
  found = {'run': os.path.join(ROOT, 'run.py')}
  for package in PACKAGES:
    for folder, _, files in os.walk(os.path.join(ROOT, package)):
      for name in files:
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          parts = os.path.relpath(path, ROOT)[:-3].split(os.sep)
          found['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
  return found


def imports(path: str, known: set[str]) -> set[str]:
  """Project modules a file imports anywhere in its body (top level or inside functions)."""
  out = set()
  for node in ast.walk(ast.parse(open(path, encoding='utf-8').read())):
    if isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      names = [node.module] + [f'{node.module}.{a.name}' for a in node.names]
    else:
      continue
    out |= {n for n in names if n in known}
  return out


def graph() -> dict[str, set[str]]:
  found = modules()
  return {name: imports(path, set(found)) - {name} for name, path in found.items()}


def test_no_module_imports_a_higher_layer():
  upward = sorted(f'{src} ({LAYERS[layer(src)]}) imports {dst} ({LAYERS[layer(dst)]})'
                  for src, dsts in graph().items() for dst in dsts if layer(dst) > layer(src))
  assert not upward, '\n'.join(upward)


def test_no_import_cycle():
  edges, state, cycles = graph(), {}, []

  def visit(node: str, path: list[str]) -> None:
    state[node] = 'open'
    for nxt in sorted(edges[node]):
      if state.get(nxt) == 'open':
        cycles.append(' -> '.join(path[path.index(nxt):] + [node, nxt]) if nxt in path else nxt)
      elif nxt not in state:
        visit(nxt, path + [node])
    state[node] = 'done'

  for node in sorted(edges):
    if node not in state:
      visit(node, [])
  assert not cycles, '\n'.join(cycles)


def test_the_walk_sees_lazy_imports():
  """The check can fail: an import inside a function is found like a top-level one."""
  found = modules()
  assert 'model.convert.gguf' in imports(found['model.pretrained'], set(found))
