"""Dependencies point down only (DESIGN §1), checked on the source with ``ast``.

* ``clipkit.core`` imports nothing of clipkit outside core (no plugin, not ``shapes``);
* a plugin (``guidance``, ``captioning``, ``rerank``, ``search``) imports core and itself only:
  what two plugins share lives in core;
* ``clipkit.shapes`` (the bundled world, its profile and recipes) is imported by the cli, the top-level
  API (:mod:`clipkit.api`: the bundled profile reaches the plugins only as a profile object) and itself only;
* no module uses another module's underscore names: neither ``from m import _x`` nor ``m._x``
  where ``m`` is an imported clipkit module (dunder names such as ``__version__`` are fine).

Every import counts, also those inside functions and under ``TYPE_CHECKING``, and so does a module
named by a string in code: a constant ``"clipkit.a.b"`` or ``"clipkit.a.b:attr"`` (a hook or a
loader table resolved with importlib later) and the argument of ``importlib.import_module(...)`` or
``__import__(...)``. Docstrings and other bare string statements are prose, not imports.
"""
from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ("guidance", "captioning", "rerank", "search")

# "clipkit.a.b" or "clipkit.a.b:attr" (bare "clipkit", e.g. a logger or distribution name, is not a module reference)
MODULE_STRING = re.compile(r"clipkit(?:\.[A-Za-z_]\w*)+(?::[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)?"
                           r"|clipkit:[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*")
IMPORT_CALLS = ("import_module", "__import__")


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@lru_cache(maxsize=None)
def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "clipkit").rglob("*.py"))}


def is_package(name: str, root: Path = ROOT) -> bool:
    return modules(root)[name].name == "__init__.py"


def layer(name: str, root: Path = ROOT) -> str:
    """clipkit.core.x -> "core"; clipkit.search -> "search"; clipkit itself and clipkit.__main__ -> "top"."""
    parts = name.split(".")
    if len(parts) == 1 or not (root / "clipkit" / parts[1]).is_dir():
        return "top"
    return parts[1]


def private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def absolute(importer: str, module: str | None, level: int, root: Path = ROOT) -> str:
    if not level:
        return module or ""
    base = importer.split(".") if is_package(importer, root) else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def owner(dotted: str, root: Path = ROOT) -> tuple[str | None, str]:
    """The longest clipkit module that prefixes ``dotted``, and the rest of the name after it."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in modules(root):
            return name, ".".join(parts[n:])
    return None, dotted


def prose(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings or other bare string statements (no effect)."""
    return {id(node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)}


def string_import(importer: str, ref: str, root: Path = ROOT):
    """``"clipkit.a.b[:attr]"`` -> (module, [first name taken from it] or None), or None if it names no module."""
    dotted, _, attr = ref.partition(":")
    mod, rest = owner(dotted, root)
    if mod is None or (mod == "clipkit" and rest):         # names no module of this tree
        return None
    first = (rest or attr).split(".")[0]
    return mod, [first] if first else None


def call_import(importer: str, call: ast.Call, root: Path = ROOT) -> tuple[ast.Constant, str] | None:
    """``importlib.import_module("m"[, package])`` / ``__import__("m")`` -> (its name constant, absolute name)."""
    func = call.func
    fname = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None
    if fname not in IMPORT_CALLS or not call.args:
        return None
    arg = call.args[0]
    if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
        return None
    name = arg.value
    if name.startswith("."):                                 # import_module(".x", package)
        package = call.args[1] if len(call.args) > 1 else next(
            (k.value for k in call.keywords if k.arg == "package"), None)
        base = package.value if isinstance(package, ast.Constant) and isinstance(package.value, str) else (
            importer if is_package(importer, root) else importer.rpartition(".")[0])
        level = len(name) - len(name.lstrip("."))
        parts = base.split(".")
        parts = parts[:len(parts) - (level - 1)]
        name = ".".join(parts + ([name.lstrip(".")] if name.lstrip(".") else []))
    return arg, name


def imports(name: str, root: Path = ROOT):
    """-> [(line, imported clipkit module, [names taken from it] or None, module-valued locals)]."""
    path = modules(root)[name]
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    out = []
    skip = prose(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "clipkit":      # `import clipkit.x.y as m` binds m, else `clipkit`
                    local = {a.asname: a.name} if a.asname else {"clipkit": "clipkit"}
                    out.append((node.lineno, a.name, None, local))
        elif isinstance(node, ast.ImportFrom):
            target = absolute(name, node.module, node.level, root)
            if target.split(".")[0] != "clipkit":
                continue
            locals_ = {}
            for a in node.names:
                if f"{target}.{a.name}" in modules(root):    # `from clipkit.core import registry`
                    locals_[a.asname or a.name] = f"{target}.{a.name}"
            out.append((node.lineno, target, [a.name for a in node.names], locals_))
        elif isinstance(node, ast.Call) and (found := call_import(name, node, root)):
            arg, ref = found
            skip.add(id(arg))                                  # counted here, not again as a string
            if ref.split(".")[0] == "clipkit" and (hit := string_import(name, ref, root)):
                out.append((node.lineno, hit[0], hit[1], {}))
    for node in ast.walk(tree):                             # "clipkit.a.b:attr" in code: an import too
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
                and MODULE_STRING.fullmatch(node.value) and (hit := string_import(name, node.value, root))):
            out.append((node.lineno, hit[0], hit[1], {}))
    return tree, out


def targets(target: str, names: list[str] | None, root: Path = ROOT) -> list[str]:
    """The clipkit modules one import statement depends on (a submodule taken by name counts)."""
    if names is None:
        return [target]
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in modules(root)]
    return subs if subs and len(subs) == len(names) else [target] + subs


def edges(root: Path = ROOT):
    """-> [(importer, line, imported module, names)] for every clipkit import in the package."""
    out = []
    for name in modules(root):
        _, found = imports(name, root)
        for line, target, names, _ in found:
            for t in targets(target, names, root):
                out.append((name, line, t, names))
    return out


def where(importer: str, line: int, root: Path = ROOT) -> str:
    return f"{modules(root)[importer].relative_to(root)}:{line}"


def allowed(importer: str, imported: str, names, root: Path = ROOT) -> bool:
    src, dst = layer(importer, root), layer(imported, root)
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


def check(rule, root: Path = ROOT) -> list[str]:
    hits = sorted({(str(modules(root)[i]), line, i, t) for i, line, t, names in edges(root) if rule(i, t, names)})
    return [f"{where(i, line, root)}: {i} imports {t}" for _, line, i, t in hits]


def core_violations(root: Path = ROOT) -> list[str]:
    return check(lambda i, t, names: layer(i, root) == "core" and not allowed(i, t, names, root), root)


def plugin_violations(plugin: str, root: Path = ROOT) -> list[str]:
    return check(lambda i, t, names: layer(i, root) == plugin and not allowed(i, t, names, root), root)


def shapes_violations(root: Path = ROOT) -> list[str]:
    return check(lambda i, t, names: layer(t, root) == "shapes" and layer(i, root) not in ("cli", "top", "shapes"), root)


def underscore_violations(root: Path = ROOT) -> list[str]:
    bad = set()
    for name in modules(root):
        tree, found = imports(name, root)
        aliases: dict[str, str] = {}
        for line, target, names, locals_ in found:
            aliases.update(locals_)
            for n in names or ():
                if private(n) and target != name and f"{target}.{n}" not in modules(root):
                    bad.add(f"{where(name, line, root)}: from {target} import {n}")
        for node in ast.walk(tree):                  # alias._x, clipkit.core.io._x
            if not isinstance(node, ast.Attribute):
                continue
            chain, base = [node.attr], node.value
            while isinstance(base, ast.Attribute):
                chain.append(base.attr)
                base = base.value
            if not isinstance(base, ast.Name) or base.id not in aliases:
                continue
            mod, rest = owner(".".join([aliases[base.id]] + chain[::-1]), root)
            first = rest.split(".")[0]
            if mod is not None and mod != name and private(first):
                bad.add(f"{where(name, node.lineno, root)}: {mod}.{first}")
    return sorted(bad)


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


PLANTED = {
    "clipkit/__init__.py": '"""The package: "clipkit.shapes.world" in a docstring is prose."""\n',
    "clipkit/core/__init__.py": "",
    "clipkit/core/io.py": "def _to_rgb(x):\n    return x\n",
    "clipkit/core/ok.py": '''"""Names clipkit.shapes.world:vocabulary in its docstring only."""
import logging
log = logging.getLogger("clipkit")


def f():
    """See "clipkit.shapes.world:vocabulary"."""
    "a bare string: clipkit.captioning.captioner"
    return "clipkit.core.io:load", "clipkit.nowhere.at.all", "see clipkit.shapes.world"
''',
    "clipkit/core/fn_import.py": "def f():\n    from clipkit.shapes import world\n    return world\n",
    "clipkit/core/hook.py": 'HOOK = dict(vocabulary="clipkit.shapes.world:vocabulary")\n',
    "clipkit/core/private_hook.py": 'RGB = "clipkit.core.io:_to_rgb"\n',
    "clipkit/shapes/__init__.py": "",
    "clipkit/shapes/world.py": "def vocabulary():\n    return []\n",
    "clipkit/captioning/__init__.py": "",
    "clipkit/captioning/captioner.py": "",
    "clipkit/guidance/__init__.py": "",
    "clipkit/guidance/latent.py": "",
    "clipkit/guidance/pipeline.py": '''import importlib
LOADERS = {"latent": "clipkit.guidance.latent:load_latent", "io": "clipkit.core.io"}


def captioner():
    return importlib.import_module("clipkit.captioning.captioner")


def relative():
    return importlib.import_module("..shapes.world", "clipkit.guidance"), __import__("clipkit.core.io")
''',
}


@pytest.fixture()
def planted(tmp_path):
    for rel, text in PLANTED.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    return tmp_path


def test_the_checker_catches_planted_violations(planted):
    assert core_violations(planted) == [
        "clipkit/core/fn_import.py:2: clipkit.core.fn_import imports clipkit.shapes.world",   # inside a function
        "clipkit/core/hook.py:1: clipkit.core.hook imports clipkit.shapes.world",             # a hook string
    ]
    assert plugin_violations("guidance", planted) == [
        "clipkit/guidance/pipeline.py:6: clipkit.guidance.pipeline imports clipkit.captioning.captioner",
        "clipkit/guidance/pipeline.py:10: clipkit.guidance.pipeline imports clipkit.shapes.world",  # relative
    ]
    assert shapes_violations(planted) == [
        "clipkit/core/fn_import.py:2: clipkit.core.fn_import imports clipkit.shapes.world",
        "clipkit/core/hook.py:1: clipkit.core.hook imports clipkit.shapes.world",
        "clipkit/guidance/pipeline.py:10: clipkit.guidance.pipeline imports clipkit.shapes.world",
    ]
    assert underscore_violations(planted) == [
        "clipkit/core/private_hook.py:1: from clipkit.core.io import _to_rgb"]
    found = {(i, t) for i, _, t, _ in edges(planted)}
    assert ("clipkit.guidance.pipeline", "clipkit.guidance.latent") in found   # a loader table entry
    assert ("clipkit.core.ok", "clipkit.core.io") in found                     # a real constant in code
    assert not {t for i, t in found if i in ("clipkit", "clipkit.core.ok")} - {"clipkit.core.io"}  # not prose


def test_core_imports_only_core():
    bad = core_violations()
    assert not bad, "core must not import plugins, shapes or the cli:\n" + "\n".join(bad)


@pytest.mark.parametrize("plugin", PLUGINS)
def test_plugins_import_only_core(plugin):
    bad = plugin_violations(plugin)
    assert not bad, (f"{plugin} may import only core (what plugins share lives in core):\n" + "\n".join(bad))


def test_only_the_cli_and_shapes_import_shapes():
    bad = shapes_violations()
    assert not bad, "only the cli and the top-level API (and shapes itself) may import clipkit.shapes:\n" + "\n".join(bad)


def test_no_module_uses_another_modules_underscore_names():
    bad = underscore_violations()
    assert not bad, "underscore names are private to their module:\n" + "\n".join(bad)
