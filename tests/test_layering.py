"""Dependencies point down only (DESIGN §1), checked on the source with ``ast``.

* ``clipkit.core`` imports nothing of clipkit outside core (no plugin, not ``shapes``);
* a plugin (``guidance``, ``captioning``, ``rerank``, ``search``) imports core and itself only:
  what two plugins share lives in core;
* ``clipkit.shapes`` (the bundled world and its recipes) is imported by the cli and itself only;
* no module uses another module's underscore names: neither ``from m import _x`` nor ``m._x``
  where ``m`` is an imported clipkit module (dunder names such as ``__version__`` are fine).

Every import counts, also those inside functions and under ``TYPE_CHECKING``. A hook named by an
import string (``"clipkit.shapes.world:vocabulary"``, resolved with importlib) is not an import.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "clipkit"
PLUGINS = ("guidance", "captioning", "rerank", "search")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def is_package(name: str) -> bool:
    return modules()[name].name == "__init__.py"


def layer(name: str) -> str:
    """clipkit.core.x -> "core"; clipkit.search -> "search"; clipkit itself and clipkit.__main__ -> "top"."""
    parts = name.split(".")
    if len(parts) == 1 or not (PACKAGE / parts[1]).is_dir():
        return "top"
    return parts[1]


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute(importer: str, module: str | None, level: int) -> str:
    if not level:
        return module or ""
    base = importer.split(".") if is_package(importer) else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def owner(dotted: str) -> tuple[str | None, str]:
    """The longest clipkit module that prefixes ``dotted``, and the rest of the name after it."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in modules():
            return name, ".".join(parts[n:])
    return None, dotted


def imports(name: str):
    """-> [(line, imported clipkit module, [names taken from it] or None, module-valued locals)]."""
    tree = ast.parse(modules()[name].read_text(encoding="utf-8"), str(modules()[name]))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "clipkit":      # `import clipkit.x.y as m` binds m, else `clipkit`
                    local = {a.asname: a.name} if a.asname else {"clipkit": "clipkit"}
                    out.append((node.lineno, a.name, None, local))
        elif isinstance(node, ast.ImportFrom):
            target = absolute(name, node.module, node.level)
            if target.split(".")[0] != "clipkit":
                continue
            locals_ = {}
            for a in node.names:
                if f"{target}.{a.name}" in modules():            # `from clipkit.core import registry`
                    locals_[a.asname or a.name] = f"{target}.{a.name}"
            out.append((node.lineno, target, [a.name for a in node.names], locals_))
    return tree, out


def targets(target: str, names: list[str] | None) -> list[str]:
    """The clipkit modules one import statement depends on (a submodule taken by name counts)."""
    if names is None:
        return [target]
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules()]
    return subs if subs and len(subs) == len(names) else [target] + subs


def edges():
    """-> [(importer, line, imported module, names)] for every clipkit import in the package."""
    out = []
    for name in modules():
        _, found = imports(name)
        for line, target, names, _ in found:
            for t in targets(target, names):
                out.append((name, line, t, names))
    return out


def where(importer: str, line: int) -> str:
    return f"{modules()[importer].relative_to(ROOT)}:{line}"


def allowed(importer: str, imported: str, names) -> bool:
    src, dst = layer(importer), layer(imported)
    if src == dst or src in ("cli", "top"):
        return True
    if dst == "top":                       # `from clipkit import __version__`: the package's dunders only
        return names is not None and all(n.startswith("__") for n in names)
    if src == "core":
        return False
    if src in PLUGINS:
        return dst == "core"
    if src == "shapes":
        return dst in ("core",) + PLUGINS
    return True


def check(rule) -> list[str]:
    hits = sorted({(str(modules()[i]), line, i, t) for i, line, t, names in edges() if rule(i, t, names)})
    return [f"{where(i, line)}: {i} imports {t}" for _, line, i, t in hits]


def test_the_walk_sees_every_kind_of_import():
    mods = modules()
    assert {"clipkit", "clipkit.core.scorer", "clipkit.rerank.rank", "clipkit.shapes.world"} <= set(mods)
    found = {(i, t) for i, _, t, _ in edges()}
    assert ("clipkit.rerank.rank", "clipkit.core.ranking") in found           # a top-level `from` import
    assert ("clipkit.core.scorer", "clipkit.core.registry") in found          # an import inside a function
    assert ("clipkit.shapes.data", "clipkit.shapes.render") in found
    assert absolute("clipkit.core.scorer", "io", 1) == "clipkit.core.io"
    assert absolute("clipkit.core", "scorer", 1) == "clipkit.core.scorer"
    assert absolute("clipkit.core.scorer", "rerank.rank", 2) == "clipkit.rerank.rank"
    assert owner("clipkit.core.io._to_rgb") == ("clipkit.core.io", "_to_rgb")


def test_core_imports_only_core():
    bad = check(lambda i, t, names: layer(i) == "core" and not allowed(i, t, names))
    assert not bad, "core must not import plugins, shapes or the cli:\n" + "\n".join(bad)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_plugins_import_only_core(plugin):
    bad = check(lambda i, t, names: layer(i) == plugin and not allowed(i, t, names))
    assert not bad, (f"{plugin} may import only core (what plugins share lives in core):\n" + "\n".join(bad))


def test_only_the_cli_and_shapes_import_shapes():
    bad = check(lambda i, t, names: layer(t) == "shapes" and layer(i) not in ("cli", "shapes"))
    assert not bad, "only the cli (and shapes itself) may import clipkit.shapes:\n" + "\n".join(bad)


def test_no_module_uses_another_modules_underscore_names():
    bad = set()
    for name in modules():
        tree, found = imports(name)
        aliases: dict[str, str] = {}
        for line, target, names, locals_ in found:
            aliases.update(locals_)
            for n in names or ():
                if private(n) and target != name and f"{target}.{n}" not in modules():
                    bad.add(f"{where(name, line)}: from {target} import {n}")
        for node in ast.walk(tree):                  # alias._x, clipkit.core.io._x
            if not isinstance(node, ast.Attribute):
                continue
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in aliases:
                continue
            mod, rest = owner(".".join([aliases[base.id]] + chain[::-1]))
            first = rest.split(".")[0]
            if mod is not None and mod != name and private(first):
                bad.add(f"{where(name, node.lineno)}: {mod}.{first}")
    assert not bad, "underscore names are private to their module:\n" + "\n".join(sorted(bad))
