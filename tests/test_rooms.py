"""One room per responsibility (issue 14): the shape of herd.py, checked through its AST.

Each check here failed on the code before the change it guards."""

from __future__ import annotations

import ast
from pathlib import Path

TREE = ast.parse((Path(__file__).resolve().parent.parent / "herd.py").read_text("utf-8"))
CLASSES = {n.name: n for n in TREE.body if isinstance(n, ast.ClassDef)}
FUNCTIONS = {n.name: n for n in TREE.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)}


def _callers(name: str, scopes: dict[str, ast.AST]) -> set[str]:
    """Functions (``Class.method`` or ``function``) among ``scopes`` that call ``name``."""
    found: set[str] = set()
    for scope_name, scope in scopes.items():
        funcs = (
            [scope]
            if isinstance(scope, ast.FunctionDef | ast.AsyncFunctionDef)
            else [f for f in scope.body if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)]
        )
        for fn in funcs:
            for call in ast.walk(fn):
                if not isinstance(call, ast.Call):
                    continue
                f = call.func
                called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")
                if called == name:
                    label = scope_name if scope is fn else f"{scope_name}.{fn.name}"
                    found.add(label)
    return found


def test_no_class_in_herd_is_much_over_700_lines() -> None:
    sizes = {name: c.end_lineno - c.lineno + 1 for name, c in CLASSES.items() if c.end_lineno}
    assert {name: n for name, n in sizes.items() if n > 750} == {}


def test_one_attempt_loop() -> None:
    """Inference, image and speech all take a node slot in one place, the attempt loop."""
    rooms = {k: CLASSES[k] for k in ("Proxy", "MediaJobs", "ModelAdmin", "DashboardApi")}
    assert _callers("acquire", rooms) == {"Proxy.route_with_retries"}
    assert _callers("route_with_retries", {"MediaJobs": CLASSES["MediaJobs"]}) == {
        "MediaJobs.capability_call"
    }


def test_one_relay() -> None:
    """Only ``relay_answer`` ends a broken stream; every relay of a node's answer uses it."""
    scopes: dict[str, ast.AST] = {**CLASSES, **FUNCTIONS}
    assert _callers("midstream_error_record", scopes) == {"relay_answer"}
    assert _callers("relay_answer", scopes) == {
        "Proxy._relay_response",
        "MediaJobs.relay_job",
        "ModelAdmin.relay_plain",
    }
