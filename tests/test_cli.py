"""`python herd.py` as users run it: a subprocess, its printed port, signals, degraded mode."""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import herd
from tests.child_process import help_text, start_herd, stop
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import raw_request

ROOT = Path(__file__).resolve().parent.parent


async def version_then_stop(args: list[str], env: dict[str, str] | None = None) -> str:
    """Start herd, ask /api/version, stop it with SIGTERM; it must exit 0. Its stderr."""
    proc, port = await start_herd(args, env=env)
    try:
        status, _, _ = await raw_request(port, "GET", "/api/version")
        assert status in (200, 503)
    finally:
        code, err = await stop(proc)
    assert code == 0, err
    return err


@pytest.fixture
async def fake() -> AsyncIterator[FakeOllama]:
    node = FakeOllama([FakeModel("llama3.2:3b")], tokens_per_s=20, response_tokens=30)
    await node.start()
    yield node
    await node.stop()


async def test_serves_then_drains_on_sigterm(tmp_path: Path, fake: FakeOllama) -> None:
    proc, port = await start_herd(
        ["--no-mdns", "--data-dir", str(tmp_path), "--node", fake.url, "--poll-interval", "0.2"]
    )
    try:
        status, _, body = await raw_request(port, "GET", "/")
        assert (status, body) == (200, b"Ollama is running")
        async with asyncio.timeout(10):
            while True:
                _, _, tags = await raw_request(port, "GET", "/api/tags")
                if json.loads(tags)["models"]:
                    break
                await asyncio.sleep(0.1)
        # a 1.5 s stream is in flight when SIGTERM arrives: it must finish
        stream = asyncio.ensure_future(
            raw_request(port, "POST", "/api/generate", b'{"model":"llama3.2:3b","prompt":"x"}')
        )
        await asyncio.sleep(0.4)
        proc.send_signal(signal.SIGTERM)
        status, _, data = await stream
        assert status == 200 and json.loads(data.splitlines()[-1])["done"] is True
        code, err = await stop(proc)
        assert code == 0, err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    # the store was flushed on the way out
    import sqlite3

    with sqlite3.connect(tmp_path / "latency.db") as conn:
        assert conn.execute("SELECT count(*) FROM request_traces").fetchone()[0] >= 1
    assert (tmp_path / "logs" / "herd.jsonl").exists()


async def test_runs_without_optional_packages(tmp_path: Path, fake: FakeOllama) -> None:
    blocked = tmp_path / "blocked"
    blocked.mkdir()
    for name in ("uvloop", "zeroconf", "psutil"):
        (blocked / f"{name}.py").write_text(f"raise ImportError('{name} blocked by test')\n")
    env = {"PYTHONPATH": str(blocked)}
    # mDNS left on: without zeroconf it must say so and carry on
    err = await version_then_stop(["--data-dir", str(tmp_path / "d"), "--node", fake.url], env)
    assert "uvloop is not installed" in err
    assert "event loop: asyncio." in err
    assert "zeroconf is not installed" in err


async def test_help_lists_environment_twins() -> None:
    text = await help_text("herd.py")
    for env in ("HERD_PORT", "HERD_NODES", "HERD_DATA_DIR", "HERD_FLEET_KEY", "HERD_API_KEYS"):
        assert env in text


async def test_runs_on_uvloop_and_says_so(tmp_path: Path, fake: FakeOllama) -> None:
    """uvloop is installed here: ``python herd.py`` must really run on it (a loop factory,
    not the ``uvloop.install()`` that newer Pythons deprecate) and name it in the log."""
    pytest.importorskip("uvloop")
    err = await version_then_stop(["--no-mdns", "--data-dir", str(tmp_path), "--node", fake.url])
    assert "event loop: uvloop.Loop" in err, err


def test_scoring_overrides_parse_and_fail_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--scoring KEY=VALUE`` (and HERD_SCORING) tune one scoring.Policy constant each; an
    unknown key, a value of the wrong type or a negative number stops the router at start."""
    import herd
    import scoring

    tuned = scoring.tuned_policy(
        scoring.Policy(), ["hot_bonus=20", "slot_probe=off", "max_retries=3", " wait_weight = 2.5"]
    )
    assert (tuned.hot_bonus, tuned.slot_probe, tuned.max_retries, tuned.wait_weight) == (
        20.0, False, 3, 2.5
    )
    assert isinstance(tuned.max_retries, int)
    for bad, why in (
        ("hot_bonus", "KEY=VALUE"),
        ("no_such=1", "KEY=VALUE"),
        ("max_retries=1.5", "takes an integer"),
        ("slot_probe=maybe", "takes true or false"),
        ("hot_bonus=-1", ">= 0"),
        ("wait_weight=nan", ">= 0"),
    ):
        with pytest.raises(ValueError, match=why):
            scoring.tuned_policy(scoring.Policy(), [bad])

    cfg = herd.config_from_args(["--scoring", "hot_bonus=7", "--scoring=eviction_weight=3"])
    assert (cfg.policy.hot_bonus, cfg.policy.eviction_weight) == (7.0, 3.0)
    monkeypatch.setenv("HERD_SCORING", "queue_weight=1,affinity_weight=0")
    cfg = herd.config_from_args([])
    assert (cfg.policy.queue_weight, cfg.policy.affinity_weight) == (1.0, 0.0)
    assert cfg.policy.hot_bonus == scoring.Policy().hot_bonus
    with pytest.raises(SystemExit) as exc:
        herd.config_from_args(["--scoring", "hot_bonus=lots"])
    assert exc.value.code == 2


async def test_tunes_the_garbage_collector_once_started(tmp_path: Path,
                                                        fake: FakeOllama) -> None:
    """``python herd.py`` freezes its startup objects out of the cyclic collector and runs
    young collections less often (issue 16), and says so in its log."""
    err = await version_then_stop(["--no-mdns", "--data-dir", str(tmp_path), "--node", fake.url])
    match = re.search(r"garbage collector: (\d+) startup objects frozen, young collections "
                      r"every (\d+) allocations", err)
    assert match is not None, err
    assert int(match[1]) > 10_000  # modules, classes, functions: far more than this
    assert int(match[2]) == herd.GC_YOUNG_ALLOCATIONS
