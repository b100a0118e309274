"""The picture of the package, checked from the source (no imports, no compute).

- Only main.py imports the training loop (flip.train); the evaluators never import the loop or
  the trainer.
- Nothing in flip/ probes a task with hasattr/getattr: tasks declare capabilities.
- No module of flip/ is over MAX_MODULE_LINES lines, and each starts with a docstring.
- Importing flip needs neither torch nor open_clip nor timm, and registers no absl flags.
"""

import ast
import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
FLIP = REPO / "flip"
MAX_MODULE_LINES = 400


def _modules():
  return sorted(FLIP.rglob("*.py"))


def _imported_modules(path: pathlib.Path):
  tree = ast.parse(path.read_text())
  names = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f"{node.module}.{alias.name}" for alias in node.names)
  return names


def _relative(path: pathlib.Path) -> str:
  return str(path.relative_to(REPO))


def test_only_main_imports_the_loop():
  importers = [_relative(p) for p in _modules() + sorted((REPO / "bench").glob("*.py"))
               + sorted((REPO / "scripts").glob("*.py")) if "flip.train" in _imported_modules(p)]
  assert importers == []
  assert "flip.train" in _imported_modules(REPO / "main.py")


def test_evaluators_do_not_import_the_loop_or_the_trainer():
  for path in sorted((FLIP / "evals").glob("*.py")):
    imported = _imported_modules(path)
    assert not imported & {"flip.train", "flip.trainer"}, _relative(path)


def test_no_attribute_probes_on_tasks():
  probe = re.compile(r"\b(hasattr|getattr)\(\s*(self\.)?task\b")
  offenders = [f"{_relative(p)}:{i}" for p in _modules() + [REPO / "main.py"]
               for i, line in enumerate(p.read_text().splitlines(), 1) if probe.search(line)]
  assert offenders == []


def test_modules_are_small_and_say_what_they_own():
  for path in _modules():
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES, _relative(path)
    assert ast.get_docstring(ast.parse(text)), f"{_relative(path)} has no module docstring"


OPTIONAL_PACKAGES = ("torch", "torchvision", "open_clip", "timm")


def _module_level_statements(path: pathlib.Path):
  """Top-level statements of a module, with those inside `if __name__ == "__main__":` left out."""
  for node in ast.parse(path.read_text()).body:
    if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
      continue
    yield node


def test_importing_flip_needs_no_torch_and_defines_no_flags():
  """torch, open_clip and timm are optional (the converters import them inside functions), and no
  module of flip/ registers absl flags when imported: only the entry point main.py owns flags."""
  offenders = []
  for path in _modules():
    for node in _module_level_statements(path):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                 else [node.module or ""])
        if any(n.split(".")[0] in OPTIONAL_PACKAGES for n in names):
          offenders.append(f"{_relative(path)}:{node.lineno} imports {names}")
      elif isinstance(node, (ast.Assign, ast.Expr)) and "flags.DEFINE_" in ast.unparse(node):
        offenders.append(f"{_relative(path)}:{node.lineno} defines an absl flag at import")
  assert offenders == []
