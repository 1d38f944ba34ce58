"""The package's layers, checked statically on every module's source (docs/architecture.md, "Layers").

Every ``import`` counts, wherever it is written: at module level, inside a function (the lazy imports that keep
torch out of ``--help``), under ``if TYPE_CHECKING``, and ``importlib.import_module`` with a literal name. Relative
imports are resolved against the importing module. ``tests/test_plugin.py`` checks the runtime side (importing
the core in a fresh interpreter loads no Qt, napari or torch); this finds what that cannot see: an import inside
a function that has not run yet.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "napari_nucsynth"
ROOT = "napari_nucsynth"

# (importer prefix, forbidden import prefixes, why)
LOWER_LAYERS = {
    # models/ holds torch modules; tiling and the pre-synthesis are below it, render/ and segment/ above it
    f"{ROOT}.models": (f"{ROOT}.render", f"{ROOT}.segment"),
    # the shared base layers that models/, render/, segment/ and train/ import downward
    f"{ROOT}.tiling": (f"{ROOT}.render", f"{ROOT}.segment", f"{ROOT}.models", f"{ROOT}.train"),
    f"{ROOT}.presynthesis": (f"{ROOT}.render", f"{ROOT}.segment", f"{ROOT}.models", f"{ROOT}.train"),
}
GUI = ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "napari", "magicgui")
GUI_ALLOWED = (f"{ROOT}._widgets", f"{ROOT}._reader", f"{ROOT}._writer", f"{ROOT}._sample_data")


def _module_name(path: Path, pkg: Path = PKG) -> tuple[str, bool]:
    """Dotted name of a source file of the package at ``pkg``, and whether it is a package's ``__init__``."""
    parts = (ROOT, *path.relative_to(pkg).with_suffix("").parts)
    if parts[-1] == "__init__":
        return ".".join(parts[:-1]), True
    return ".".join(parts), False


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 > len(base) - 1:
        raise ValueError(f"{module}: relative import beyond the top-level package")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports_of(path: Path, pkg: Path = PKG) -> list[tuple[int, str]]:
    """Every (line, absolute module name) that ``path`` imports; ``from X import y`` gives both X and X.y (y may
    be a submodule)."""
    module, is_package = _module_name(path, pkg)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.level, node.module)
            found.append((node.lineno, base))
            found += [(node.lineno, f"{base}.{a.name}" if base else a.name) for a in node.names if a.name != "*"]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            found.append((node.lineno, node.args[0].value))
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


SOURCES = sorted(PKG.rglob("*.py"))


def _violations(rules) -> list[str]:
    """One line per offending import statement: ``file:line: module imports name (why)``."""
    bad = {}
    for path in SOURCES:
        module, _ = _module_name(path)
        for line, name in imports_of(path):
            msg = rules(module, name)
            where = f"{path.relative_to(PKG.parent)}:{line}"
            if msg and where not in bad:
                bad[where] = f"{where}: {module} imports {name} ({msg})"
    return [bad[k] for k in sorted(bad)]


def test_sources_found():
    names = {_module_name(p)[0] for p in SOURCES}
    assert {f"{ROOT}.tiling", f"{ROOT}.presynthesis", f"{ROOT}.models.hovernet", f"{ROOT}.cli"} <= names


@pytest.mark.parametrize("importer", sorted(LOWER_LAYERS))
def test_lower_layers_do_not_import_upward(importer):
    """models/ imports neither render/ nor segment/; tiling.py and presynthesis.py import none of render/,
    segment/, models/ or train/ (they are what those import)."""

    def rule(module, name):
        if _under(module, importer):
            hit = [p for p in LOWER_LAYERS[importer] if _under(name, p)]
            return f"{importer} is below {hit[0]}" if hit else None
        return None

    bad = _violations(rule)
    assert not bad, "imports against the layering (docs/architecture.md):\n" + "\n".join(bad)


def test_only_widgets_and_npe2_glue_import_qt_napari_or_magicgui():
    def rule(module, name):
        if any(_under(module, p) for p in GUI_ALLOWED):
            return None
        hit = [g for g in GUI if _under(name, g)]
        return f"{hit[0]} belongs in _widgets/ or the npe2 glue" if hit else None

    bad = _violations(rule)
    assert not bad, "GUI imports outside _widgets/ and the npe2 glue:\n" + "\n".join(bad)


def test_the_checker_resolves_relative_and_nested_imports(tmp_path):
    """The checker itself: relative imports of every form, imports inside functions, import_module."""
    pkg = tmp_path / "napari_nucsynth"
    (pkg / "models").mkdir(parents=True)
    (pkg / "models" / "__init__.py").write_text("from ..segment import x\n")
    (pkg / "models" / "m.py").write_text(
        "from .. import render\n"
        "def f():\n"
        "    from ..render.classic import C\n"
        "    import napari_nucsynth.segment.watershed\n"
        "    import importlib\n"
        "    importlib.import_module('napari_nucsynth.render')\n"
        "from . import vgg\n"
        "from ..tiling import predict_dense\n"
    )
    names = [n for _, n in imports_of(pkg / "models" / "m.py", pkg)]
    assert f"{ROOT}.render" in names and f"{ROOT}.render.classic" in names
    assert f"{ROOT}.segment.watershed" in names and f"{ROOT}.models.vgg" in names
    assert f"{ROOT}.tiling.predict_dense" in names
    assert names.count(f"{ROOT}.render") == 2  # `from .. import render` and import_module
    assert f"{ROOT}.segment" in [n for _, n in imports_of(pkg / "models" / "__init__.py", pkg)]
