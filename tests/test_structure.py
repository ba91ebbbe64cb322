"""The architecture, held to docs/design.md: kdad's imports (those inside functions included)
form no cycle and go only down its layers, and no dataset is named in the code that trains,
tests or runs grids."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "kdad"

# docs/design.md "Layers", lowest first: a module may import its own layer and those below.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "files", "metrics", "page", "config"),
    ("data", "backbones", "synth.perlin", "synth.ddpm"),
    ("engine.checkpoint", "engine.distributed", "engine.pool", "engine.lock", "engine.loop"),
    ("synth",),
    ("models",),
    ("engine",),
    ("detector", "outputs", "export", "report", "protocol"),
    ("serve", "grid"),
    ("api",),
    ("cli", "__main__", ""),
]


def modules() -> dict[str, Path]:
    """Every module of kdad by dotted name relative to the package ("" is kdad itself)."""
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The kdad modules ``name`` imports anywhere in its file (``from kdad.x import y``
    counts as kdad.x.y when that is a module, else kdad.x)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(["kdad", *[b for b in base if b], *[node.module or ""]]).strip(".")
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            if t != "kdad" and not t.startswith("kdad."):
                continue
            t = t.removeprefix("kdad").lstrip(".")
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t in known and t != name:
                found.add(t)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {n: imports(n, p, known) for n, p in known.items()}


def layer(name: str) -> int:
    """The layer of a module: the most specific entry of LAYERS that names it or a package
    above it."""
    best, depth = None, -1
    for i, entries in enumerate(LAYERS):
        for e in entries:
            if (name == e or (e and name.startswith(e + "."))) and len(e) > depth:
                best, depth = i, len(e)
    assert best is not None, f"module kdad.{name} is in no layer of docs/design.md"
    return best


def test_imports_form_no_cycle() -> None:
    g = graph()
    assert len(g) > 40 and g["api"]  # the walk sees the package
    state: dict[str, int] = {}  # 1 on the current path, 2 done

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(g[n]):
            if state.get(m) == 1:
                cycle = [*path[path.index(m) :], m]
                pytest.fail("import cycle: " + " -> ".join(f"kdad.{c}" for c in cycle))
            if m not in state:
                visit(m, [*path, m])
        state[n] = 2

    for n in sorted(g):
        if n not in state:
            visit(n, [n])


def test_imports_go_down_the_layers() -> None:
    upward = [
        f"kdad.{a} (layer {layer(a)}) imports kdad.{b} (layer {layer(b)})"
        for a, deps in graph().items()
        for b in deps
        if layer(b) > layer(a)
    ]
    assert not upward, "\n".join(upward)


def test_the_walk_finds_imports_inside_functions(tmp_path: Path) -> None:
    mod = tmp_path / "m.py"
    mod.write_text("def f():\n    from kdad.api import train\n    from . import files\n")
    known = {"api": Path(), "files": Path(), "engine.m": mod}
    assert imports("engine.m", mod, known) == {"api"}  # relative: kdad.engine.files, unknown


def test_no_dataset_is_named_in_the_code_that_trains_tests_and_runs_grids() -> None:
    files = [
        *(SRC / "engine").glob("*.py"),
        *(SRC / n for n in ("api.py", "grid.py", "protocol.py", "detector.py")),
    ]
    named = []
    for f in files:
        tree = ast.parse(f.read_text())
        docs = {
            id(n.body[0].value)
            for n in ast.walk(tree)
            if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))
            and n.body
            and isinstance(n.body[0], ast.Expr)
        }
        for node in ast.walk(tree):
            text = None
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = None if id(node) in docs else node.value
            elif isinstance(node, ast.Name):
                text = node.id
            elif isinstance(node, (ast.Attribute, ast.alias)):
                text = getattr(node, "attr", None) or getattr(node, "name", "")
            if text and any(d in text.lower() for d in ("mtd", "magnetic", "weld")):
                named.append(f"{f.name}:{node.lineno}: {text!r}")
    assert not named, named


USER_FACING = ("cli.py", "api.py", "protocol.py", "detector.py", "serve.py", "grid.py")


def test_settings_defaults_are_typed_once_in_the_config_dataclasses() -> None:
    """How "one source of settings" is checked: in the modules users call (CLI and Python API)
    no parameter default and no flag default is a literal other than None or a bool, and no
    help text spells a default out; they all name a field of kdad.config's dataclasses."""
    typed = []
    for name in USER_FACING:
        f = SRC / name
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.FunctionDef) and not node.name.startswith("_"):
                a = node.args
                for d in [*a.defaults, *a.kw_defaults]:
                    if isinstance(d, ast.Constant) and not isinstance(d.value, (bool, type(None))):
                        typed.append(f"{name}:{d.lineno}: def {node.name}(... = {d.value!r})")
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument":
                for kw in node.keywords:
                    v = kw.value
                    if kw.arg == "default" and isinstance(v, ast.Constant) and v.value is not None:
                        typed.append(f"{name}:{v.lineno}: default={v.value!r}")
                    text = str(v.value) if isinstance(v, ast.Constant) else ""
                    if kw.arg == "help" and re.search(r"\([\d.]+\)|default:? \d", text):
                        typed.append(f"{name}:{v.lineno}: help {v.value!r}")
    assert not typed, "\n".join(typed)


def test_results_page_is_what_its_script_writes() -> None:
    """docs/results.md is generated from the results files, never edited by hand."""
    import subprocess
    import sys

    script = SRC.parents[1] / "bench" / "results_page.py"
    proc = subprocess.run([sys.executable, str(script), "--check"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
