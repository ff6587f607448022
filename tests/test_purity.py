"""Module boundaries, checked on the source (AST), not by importing anything.

* scoring.py is pure: no I/O, clocks, randomness, concurrency or logging modules.
* store.py is the only top-level module that talks to SQLite.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP_LEVEL = ("herd.py", "herd_node.py", "scoring.py", "store.py")
FORBIDDEN_IN_SCORING = frozenset(
    {
        "asyncio",
        "socket",
        "sqlite3",
        "time",
        "random",
        "logging",
        "threading",
        "subprocess",
        "os",
        "secrets",
        "datetime",
        "uuid",
        "multiprocessing",
        "concurrent",
        "selectors",
        "ssl",
        "http",
        "urllib",
        "io",
        "pathlib",
        "shutil",
        "tempfile",
    }
)


def imported_roots(path: Path) -> set[str]:
    """Top-level names of every module imported anywhere in the file (incl. functions)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    roots: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "__import__"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            roots.add(node.args[0].value.split(".")[0])
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
        ):
            roots.add("importlib")
    return roots


def test_scoring_imports_nothing_impure() -> None:
    roots = imported_roots(ROOT / "scoring.py")
    assert not roots & FORBIDDEN_IN_SCORING, roots & FORBIDDEN_IN_SCORING
    assert "importlib" not in roots


def test_scoring_has_no_builtin_io_calls() -> None:
    tree = ast.parse((ROOT / "scoring.py").read_text(encoding="utf-8"))
    calls = {
        n.func.id
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
    }
    assert not calls & {"open", "print", "input", "exec", "eval", "__import__"}


def test_scoring_has_no_module_level_mutable_state() -> None:
    tree = ast.parse((ROOT / "scoring.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign):
            value = node.value
            assert not isinstance(
                value, ast.List | ast.Dict | ast.Set | ast.ListComp | ast.DictComp | ast.SetComp
            ), ast.unparse(node)
        if isinstance(node, ast.Global):
            pytest.fail("global statement in scoring.py")
    for fn in ast.walk(tree):
        if isinstance(fn, ast.Global | ast.Nonlocal):
            pytest.fail(f"{type(fn).__name__} in scoring.py")


@pytest.mark.parametrize("name", TOP_LEVEL)
def test_only_store_imports_sqlite3(name: str) -> None:
    path = ROOT / name
    assert path.exists(), f"{name} is gone: update TOP_LEVEL"
    uses = "sqlite3" in imported_roots(path)
    if name == "store.py":
        assert uses, "store.py no longer imports sqlite3: who talks to SQLite now?"
    else:
        assert not uses, f"{name} imports sqlite3; only store.py may"


def test_checker_sees_imports_inside_functions(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text(
        "def f():\n    import time\n    from socket import socket\n    __import__('random')\n"
    )
    assert {"time", "socket", "random"} <= imported_roots(f)


STREAM_IO = frozenset(
    {"write", "writelines", "write_eof", "drain", "read", "readline", "readexactly", "readuntil"}
)


def test_only_httpstream_moves_connection_bytes_in_the_router() -> None:
    """ARCHITECTURE.md: class ``HttpStream`` is the only code in herd.py that reads or
    writes a connection (``reader``/``writer`` of asyncio streams), server and client side."""
    tree = ast.parse((ROOT / "herd.py").read_text(encoding="utf-8"))
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "HttpStream":
            inside.update(id(n) for n in ast.walk(node))
    outside = []
    for node in ast.walk(tree):
        if not (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in STREAM_IO
        ):
            continue
        recv = node.func.value
        name = recv.id if isinstance(recv, ast.Name) else getattr(recv, "attr", "")
        if name in ("reader", "writer") and id(node) not in inside:
            outside.append(f"line {node.lineno}: {name}.{node.func.attr}()")
    assert outside == []
