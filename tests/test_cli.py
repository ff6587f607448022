"""`python herd.py` as users run it: a subprocess, its printed port, signals, degraded mode."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import raw_request

ROOT = Path(__file__).resolve().parent.parent


async def start_herd(
    args: list[str], env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, int]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(ROOT / "herd.py"),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--local-ollama",
        "off",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
        cwd=str(ROOT),
    )
    assert proc.stdout is not None
    async with asyncio.timeout(20):
        line = (await proc.stdout.readline()).decode()
    assert line.startswith("herd listening on 127.0.0.1:"), line
    return proc, int(line.rsplit(":", 1)[1])


async def stop(proc: asyncio.subprocess.Process) -> tuple[int, str]:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(20):
        _, err = await proc.communicate()
    return proc.returncode or 0, err.decode()


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
    proc, port = await start_herd(["--data-dir", str(tmp_path / "d"), "--node", fake.url], env=env)
    try:
        status, _, _ = await raw_request(port, "GET", "/api/version")
        assert status in (200, 503)
    finally:
        code, err = await stop(proc)
    assert code == 0, err
    assert "uvloop is not installed" in err
    assert "event loop: asyncio." in err
    assert "zeroconf is not installed" in err


async def test_help_lists_environment_twins() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "herd.py"), "--help", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    text = out.decode()
    for env in ("HERD_PORT", "HERD_NODES", "HERD_DATA_DIR", "HERD_FLEET_KEY", "HERD_API_KEYS"):
        assert env in text


async def test_runs_on_uvloop_and_says_so(tmp_path: Path, fake: FakeOllama) -> None:
    """uvloop is installed here: ``python herd.py`` must really run on it (a loop factory,
    not the ``uvloop.install()`` that newer Pythons deprecate) and name it in the log."""
    pytest.importorskip("uvloop")
    proc, port = await start_herd(["--no-mdns", "--data-dir", str(tmp_path), "--node", fake.url])
    try:
        status, _, _ = await raw_request(port, "GET", "/api/version")
        assert status in (200, 503)
    finally:
        code, err = await stop(proc)
    assert code == 0, err
    assert "event loop: uvloop.Loop" in err, err
