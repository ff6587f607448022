"""Under CI=true a test whose prerequisite is missing fails instead of skipping silently:
CI's .ci/run installs every prerequisite, so a skip there can only hide a broken install.

Each case runs the one test in a child pytest with CI=true and the prerequisite hidden
(an empty PATH for the sqlite3 / ip commands, a plugin that hides the real backend).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

HIDE_BACKEND = '''
import tests.real_node
tests.real_node.real_backend_available = lambda: (False, "real backend hidden by the test")
'''


def run_under_ci(nodeid: str, env: dict[str, str]) -> tuple[int, str]:
    child = {**os.environ, **env, "CI": "true"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:randomly", "-p", "no:cacheprovider",
         "--timeout", "60", *(["-p", "hide_backend"] if "PYTHONPATH" in env else []), nodeid],
        capture_output=True, text=True, timeout=120, cwd=str(ROOT), env=child, check=False,
    )
    return proc.returncode, proc.stdout + proc.stderr


CASES = [
    ("tests/test_store.py::test_sqlite_cli_query_from_the_issue_works", "path"),
    ("tests/test_node_agent.py::test_discovery_in_network_namespace_follows_router", "path"),
    ("tests/test_real_node.py::test_lifecycle_start_stop_kill_no_orphans", "backend"),
]


@pytest.mark.parametrize(("nodeid", "hide"), CASES, ids=lambda v: v.rsplit("::", 1)[-1])
def test_missing_prerequisite_fails_under_ci(
    nodeid: str, hide: str, tmp_path: Path
) -> None:
    if hide == "path":
        env = {"PATH": str(tmp_path)}  # neither sqlite3 nor ip on it
    else:
        (tmp_path / "hide_backend.py").write_text(HIDE_BACKEND)
        env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    code, out = run_under_ci(nodeid, env)
    summary = out.strip().splitlines()[-1]
    assert code == 1 and " failed" in summary and "skipped" not in summary, out[-2000:]
    assert "prerequisite missing in CI" in out
