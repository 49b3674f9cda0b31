"""The package's import graph against its layer table (BUILD_NOTES, "The house").

Every ``tvgeo_jax`` module belongs to the layer of its package; a module may import
modules of its own layer or of lower ones, never a higher one, and the module graph has
no cycle. Imports inside functions count like any other (they are how cycles hide).
``experiments`` sits above the whole library and nothing in ``tvgeo_jax`` imports it.
"""
import ast
import pathlib
import shutil
import tempfile
from typing import Dict, Iterable, List, Set, Tuple

from absl.testing import absltest

ROOT = pathlib.Path(__file__).resolve().parent.parent

# Lowest first. Same-layer imports are allowed (cycles are checked separately).
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("core",),
    ("data", "models", "adapters"),
    ("vectors", "geometry", "merging", "analysis", "evaluation"),
    ("training", "pretraining"),
    ("studies",),
)
TOP = len(LAYERS)  # experiments/ and benchmarks/


def layer_of(module: str) -> int:
  parts = module.split(".")
  if parts[0] in ("experiments", "benchmarks"):
    return TOP
  if parts[0] != "tvgeo_jax":
    raise ValueError(module)
  if len(parts) == 1:
    return 0  # the package's own __init__ (version string only)
  for i, packages in enumerate(LAYERS):
    if parts[1] in packages:
      return i
  raise AssertionError(f"tvgeo_jax.{parts[1]} is in no layer of the table; add it to "
                       "LAYERS here and to the layer table in BUILD_NOTES.md")


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
  rel = path.relative_to(root).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts = parts[:-1]
  return ".".join(parts)


def imports_of(source: str, known: Set[str]) -> List[Tuple[str, int]]:
  """(imported project module, line) for every import in ``source``: ``from a.b import
  c`` counts as ``a.b.c`` when that is a module, else as ``a.b``."""
  out = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      out += [(a.name, node.lineno) for a in node.names if a.name in known]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      if node.module.split(".")[0] not in ("tvgeo_jax", "experiments", "benchmarks"):
        continue
      for a in node.names:
        full = f"{node.module}.{a.name}"
        out.append((full if full in known else node.module, node.lineno))
  return out


def import_graph(root: pathlib.Path, packages: Iterable[str] = ("tvgeo_jax", "experiments")
                 ) -> Dict[str, List[Tuple[str, int]]]:
  files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
  known = set(files)
  return {m: [(t, line) for t, line in imports_of(p.read_text(), known) if t != m]
          for m, p in files.items()}


def upward_imports(graph) -> List[str]:
  bad = []
  for module, targets in graph.items():
    for target, line in targets:
      if target.split(".")[0] == "tvgeo_jax" and target != "tvgeo_jax" and (
          layer_of(target) > layer_of(module)):
        bad.append(f"{module}:{line} imports {target} (layer {layer_of(target)} > "
                   f"{layer_of(module)})")
      if module.startswith("tvgeo_jax") and target.split(".")[0] in ("experiments",
                                                                     "benchmarks"):
        bad.append(f"{module}:{line} imports {target} (the library never imports "
                   "entry points)")
  return bad


def find_cycle(graph) -> List[str]:
  """One cycle of the module graph (package __init__ re-exports included), or []."""
  edges = {m: sorted({t for t, _ in targets if t in graph}) for m, targets in graph.items()}
  state: Dict[str, int] = {}
  stack: List[str] = []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for t in edges[m]:
      if state.get(t) == 1:
        return stack[stack.index(t):] + [t]
      if t not in state:
        found = visit(t)
        if found:
          return found
    stack.pop()
    state[m] = 2
    return []

  for m in sorted(edges):
    if m not in state:
      found = visit(m)
      if found:
        return found
  return []


class LayeringTest(absltest.TestCase):

  def test_every_package_has_a_layer(self):
    for p in (ROOT / "tvgeo_jax").iterdir():
      if p.is_dir() and (p / "__init__.py").exists():
        layer_of(f"tvgeo_jax.{p.name}")
      elif p.suffix == ".py" and p.name != "__init__.py":
        self.fail(f"{p.name}: library modules live in a package of the layer table, not "
                  "at the top of tvgeo_jax/")

  def test_no_upward_imports(self):
    bad = upward_imports(import_graph(ROOT))
    self.assertEqual(bad, [], "imports from a higher layer:\n" + "\n".join(bad))

  def test_no_cycles(self):
    cycle = find_cycle(import_graph(ROOT))
    self.assertEqual(cycle, [], "import cycle: " + " -> ".join(cycle))

  def test_the_checks_fail_on_a_planted_upward_import_and_cycle(self):
    """The test of the test: a scratch copy of two modules with an upward import planted
    (training importing studies) and a cycle (core.a <-> core.b)."""
    tmp = pathlib.Path(tempfile.mkdtemp())
    self.addCleanup(shutil.rmtree, tmp)
    for pkg in ("tvgeo_jax", "tvgeo_jax/core", "tvgeo_jax/training", "tvgeo_jax/studies",
                "experiments"):
      (tmp / pkg).mkdir(parents=True, exist_ok=True)
      (tmp / pkg / "__init__.py").write_text("")
    (tmp / "tvgeo_jax/studies/report.py").write_text("from tvgeo_jax.core import a\n")
    (tmp / "tvgeo_jax/training/loop.py").write_text(
        "def f():\n  from tvgeo_jax.studies import report\n")
    (tmp / "tvgeo_jax/core/a.py").write_text("from tvgeo_jax.core import b\n")
    (tmp / "tvgeo_jax/core/b.py").write_text("import tvgeo_jax.core.a\n")
    graph = import_graph(tmp)
    self.assertEqual(upward_imports(graph), [
        "tvgeo_jax.training.loop:2 imports tvgeo_jax.studies.report (layer 4 > 3)"])
    self.assertEqual(find_cycle(graph), ["tvgeo_jax.core.a", "tvgeo_jax.core.b",
                                         "tvgeo_jax.core.a"])
    # and the real tree, with the plant removed, is clean of both (the tests above)


if __name__ == "__main__":
  absltest.main()
