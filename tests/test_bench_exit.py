"""The benchmarks are checks that can fail: each exits non-zero when its target is missed.

routing_sim is a pure simulation, so it runs here for real (a short simulated hour); the
other two need several processes and minutes of load, so their verdicts are checked on
figures given to the same function their ``main`` returns.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.chaos import ChaosResult, Outcome

ROOT = Path(__file__).resolve().parent.parent


def bench(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("target", "code"), [("0.0", 1), ("50", 0)])
def test_routing_sim_exits_non_zero_when_the_target_is_missed(target: str, code: int) -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "routing_sim.py"), "--duration", "300",
         "--target", target],
        capture_output=True, text=True, timeout=120, cwd=str(ROOT), check=False,
    )
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert ("MISS" in proc.stdout) == (code == 1)


def test_routing_sim_default_target_is_the_stated_one() -> None:
    sim = bench("routing_sim")
    assert sim.TARGET_RATIO == 0.70
    assert sim.exit_code([0.5, 0.69], 0.70) == 0
    assert sim.exit_code([0.5, 0.71], 0.70) == 1
    assert sim.exit_code([float("nan")], 0.70) == 1  # a broken run is no pass


def test_store_overhead_exit_code() -> None:
    so = bench("store_overhead")
    assert so.TARGET_RATIO == 1.05
    assert so.exit_code(1.049, so.TARGET_RATIO) == 0
    assert so.exit_code(1.06, so.TARGET_RATIO) == 1


def test_learning_persist_exit_code() -> None:
    lp = bench("learning_persist")
    assert (lp.TARGET_DIFF_RATIO, lp.TARGET_GAP_RATIO, lp.GAP_SLACK_MS) == (0.25, 3.0, 5.0)
    assert lp.exit_code(0.25, 11.0, 2.0) == 0
    assert lp.exit_code(0.26, 1.0, 2.0) == 1
    assert lp.exit_code(0.01, 11.1, 2.0) == 1
    assert lp.exit_code(float("nan"), 1.0, 2.0) == 1


def outcome(ok: bool, clean: bool) -> Outcome:
    return Outcome("generate", 200 if ok else 502, ok, clean, 0.01)


def test_chaos_exit_code() -> None:
    ch = bench("chaos")
    fine = ChaosResult(outcomes=[outcome(True, False), outcome(False, True)])
    lost = ChaosResult(outcomes=[outcome(True, False), outcome(False, False)])
    assert ch.exit_code(fine, fine) == 0
    assert ch.exit_code(fine, lost) == 1
    assert ch.exit_code(lost, fine) == 1


def test_routing_e2e_judges_repeated_runs_on_their_medians() -> None:
    """``--repeat N``: one lucky or unlucky run no longer decides a cell. Each figure is its
    median over the runs, a failed request in any run still counts, and the verdict is
    the same function a single run uses."""
    e2e = bench("routing_e2e")

    def run(herd_mean: float, failed: int = 0) -> dict[str, object]:
        def figs(policy: str, mean: float, cold: int, failed: int = 0) -> object:
            return e2e.PolicyFigures(
                policy=policy, n=60, failed=failed, mean=mean, p50=mean, p99=3 * mean,
                ttft_p50=0.5, chat_ttft_p50=0.2 if policy.startswith("herd") else 1.0,
                cold_loads=cold, evictions=0, wrong_model=0, retries=0, cached_share=0.0)
        return {"lo": figs("lo", 10.0, 20), "herd-node": figs("herd-node", herd_mean, 4, failed)}

    good, bad = run(5.0), run(9.0)
    assert e2e.verdict(e2e.median_figures([good])) == []
    assert e2e.verdict(e2e.median_figures([bad]))  # a single run decides alone
    assert e2e.verdict(e2e.median_figures([good, bad, good])) == []  # one bad run of three
    missed = e2e.verdict(e2e.median_figures([bad, good, bad]))
    assert any("mean 0.90x" in m for m in missed)  # the median run is the bad one
    # a failure in any run is a failure of the cell
    assert any("failed requests" in m
               for m in e2e.verdict(e2e.median_figures([good, run(5.0, failed=1), good])))
    assert "herd-node 0.50 0.90 0.50" in e2e.spread_line([good, bad, good])
