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
    assert _callers("acquire", rooms) == {"Proxy._acquire_or_answer"}
    assert _callers("_acquire_or_answer", rooms) == {"Proxy.route_with_retries"}
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


def _init_attrs(cls: str) -> set[str]:
    init = next(
        f for f in CLASSES[cls].body if isinstance(f, ast.FunctionDef) and f.name == "__init__"
    )
    return {
        t.attr
        for n in ast.walk(init)
        if isinstance(n, ast.Assign | ast.AnnAssign)
        for t in (n.targets if isinstance(n, ast.Assign) else [n.target])
        if isinstance(t, ast.Attribute)
    }


def test_the_learner_owns_what_is_learned_and_the_fleet_does_not() -> None:
    learned = {"slot_bounds", "node_slot_bounds", "memory_bounds", "ps_seen", "run_ends",
               "affinity", "affinity_writes"}  # fmt: skip
    assert learned <= _init_attrs("Learner")
    assert learned & _init_attrs("Fleet") == set()


def test_learner_on_its_own() -> None:
    """The Learner needs no router: a policy and the configured slots."""
    import dataclasses

    import herd
    import scoring

    policy = dataclasses.replace(scoring.Policy(), affinity_max_entries=2)
    learner = herd.Learner(policy, {"gpu": 3})
    for i in range(1, 1025):  # the 1024th write sweeps the table down to its bound
        learner.remember_prefix(f"prefix{i}", "gpu", 100, 1000.0 + i)
    assert list(learner.affinity) == ["prefix1023", "prefix1024"]
    node = herd.Node("gpu", "http://127.0.0.1:1", "static")
    public = learner.learned_public(node, {("gpu", "m:latest"): scoring.ServiceStats()}, 2000.0)
    assert public["slots"]["source"] == "configured" and public["slots"]["in_use"] == 3
    assert public["memory"] is None and "m:latest" in public["models"]
    assert learner.learned_slots("gpu", "m:latest") == scoring.learned_slots(None, 0.0, policy)


def test_router_has_no_delegates_to_its_collaborators() -> None:
    """State and operations are reached at their owner (``router.fleet.nodes``,
    ``router.admission.acquire``), not through Router pass-throughs."""
    owned = {
        "Fleet": {"nodes", "stats", "breakers", "refresh_node",
                  "apply_heartbeat", "fleet_status", "status_json", "_snapshots"},
        "Consent": {"held_nodes", "admissions", "admission_of", "hold_node",
                    "h_node_approve", "h_node_reject"},
        "Admission": {"queues", "waiters", "queue_for", "acquire", "release"},
        "Learner": {"learned_slots"},
    }  # fmt: skip
    router = {
        f.name
        for f in CLASSES["Router"].body
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
    }
    for owner, names in owned.items():
        assert router & names == set(), owner


def test_reported_model_names_are_normalised_in_one_place() -> None:
    """A node's /api/ps, /api/tags and capability entries get their model key where the
    report is parsed (``_entry_name``, ``CapabilitiesReport.parse``), not at each use."""
    scopes: dict[str, ast.AST] = {**CLASSES, **FUNCTIONS}
    sites: set[str] = set()
    for scope_name, scope in scopes.items():
        for fn in ast.walk(scope):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for call in ast.walk(fn):
                if (
                    isinstance(call, ast.Call)
                    and isinstance(call.func, ast.Attribute)
                    and call.func.attr == "normalize_model"
                    and "'name'" in ast.unparse(call.args[0])
                ):
                    sites.add(fn.name if scope is fn else f"{scope_name}.{fn.name}")
    assert sites == {"_entry_name", "CapabilitiesReport.parse"}


def test_parsed_reports_carry_names_and_job_slots() -> None:
    import herd

    tags = herd.AvailableModels.of([{"name": "Llama3", "size": 5}, {"model": "Qwen:7B"}])
    assert [name for name, _ in tags.named] == ["llama3:latest", "qwen:7b"]
    assert tags.named[0][1] is tags.entries[0]  # the entry as reported, for relaying
    caps = herd.CapabilitiesReport.parse(
        {
            "image": [{"name": "Z-Image", "slots": 3}, {"name": "flux"}],
            "stt": [{"name": "whisper", "slots": 99}],  # out of bounds: the default
        }
    )
    assert caps.slots == {("image", "z-image:latest"): 3}


def test_long_functions_named_in_the_issue_are_split() -> None:
    node_tree = ast.parse((Path(__file__).resolve().parent.parent / "herd_node.py").read_text())
    sizes = {
        f.name: f.end_lineno - f.lineno + 1
        for tree in (TREE, node_tree)
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef | ast.AsyncFunctionDef)
        and f.name in ("serve_routed", "discover")
        and f.end_lineno is not None
    }
    assert sizes.keys() == {"serve_routed", "discover"}
    assert max(sizes.values()) <= 60, sizes
