"""Several routers for one fleet (issue 17): the node agent reports to every router (flags,
environment, mDNS), each router's reply handled on its own; the router's ``GET /healthz``
readiness and drain delay; the other routers of the fleet on ``/fleet/status``.

The nginx-in-front end-to-end test is tests/test_nginx.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

import herd
import herd_node
from tests.conftest import RouterFactory
from tests.fake_ollama import FakeOllama
from tests.test_node_agent import LLAMA, agent_config, status_of, wait_until
from tests.test_router import raw_request

ROOT = Path(__file__).resolve().parent.parent
INTERVAL = 0.3
JSON = dict[str, Any]


def free_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# =======================================================================================
# flags and environment
# =======================================================================================


def test_router_urls_from_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HERD_ROUTER_URL", raising=False)
    cfg = herd_node.config_from_args(
        ["--router-url", "http://10.0.0.1:11435", "--router-url", "10.0.0.2", "--node-id", "n"]
    )
    assert cfg.router_urls == ("http://10.0.0.1:11435", "http://10.0.0.2:11435")
    assert herd_node.config_from_args(["--node-id", "n"]).router_urls == ()  # mDNS

    # the environment twin is a comma-separated list (it used to crash on the comma)
    monkeypatch.setenv("HERD_ROUTER_URL", "http://a:1, http://b:2,,http://a:1")
    assert herd_node.config_from_args(["--node-id", "n"]).router_urls == (
        "http://a:1",
        "http://b:2",
    )
    # flags win over the environment; one flag may carry a list too
    cfg = herd_node.config_from_args(["--router-url", "http://c:3,http://d:4", "--node-id", "n"])
    assert cfg.router_urls == ("http://c:3", "http://d:4")

    for bad in ("http://a:port", "https://a:1", "http://a:1/api"):
        with pytest.raises(SystemExit) as info:
            herd_node.config_from_args(["--router-url", bad, "--node-id", "n"])
        assert "--router-url" in str(info.value) and repr(bad) in str(info.value)


# =======================================================================================
# one agent, several routers, each with its own answer
# =======================================================================================


@contextlib.asynccontextmanager
async def black_hole() -> AsyncIterator[str]:
    """A router that accepts the connection, reads the beat and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for w in held:
            w.close()
        server.close()


class SlowBeatRouter:
    """A minimal heartbeat endpoint that asks for a slower beat (``interval_s``) in its
    signed reply and records what it got."""

    def __init__(self, key: str, interval_s: float) -> None:
        self.key, self.interval_s = key, interval_s
        self.beats: list[tuple[float, JSON]] = []
        self.server = herd.HttpServer(self.handle, herd.Limits(), self.on_error)
        self.url = ""

    async def handle(self, request: herd.Request, response: herd.Response) -> None:
        beat = json.loads(await request.read_body(1 << 22))
        self.beats.append((time.monotonic(), beat))
        reply = herd.dumps(
            {"ok": True, "router_id": "slowbeat", "interval_s": self.interval_s,
             "need_full": False}
        )
        sig = herd.sign(self.key, int(time.time()), reply)
        await response.send(200, reply, "application/json", [("x-herd-signature", sig)])

    async def on_error(self, request: Any, response: Any, exc: herd.HttpError) -> None:
        if response is not None:
            await response.json({"error": exc.message}, exc.status)

    async def __aenter__(self) -> SlowBeatRouter:
        host, port = await self.server.start("127.0.0.1", 0)
        self.url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.server.stop(0.5)


async def test_agent_beats_every_router_on_its_own(make_router: RouterFactory) -> None:
    key = "fleet-secret"
    r1 = await make_router([], heartbeat_interval_s=INTERVAL, fleet_key=key)
    r2 = await make_router([], heartbeat_interval_s=INTERVAL, fleet_key=key)
    foreign = await make_router([], heartbeat_interval_s=INTERVAL, fleet_key="not-ours")
    dead_port = free_port()
    dead = f"http://127.0.0.1:{dead_port}"
    async with FakeOllama([LLAMA]) as fake, black_hole() as hole, SlowBeatRouter(
        key, 1.0
    ) as slow:
        urls = (hole, r1.url, dead, foreign.url, slow.url, r2.url)
        config = agent_config(
            None, fake, "multi", router_urls=urls, fleet_key=key, router_timeout_s=20.0
        )
        agent = herd_node.Agent(config)
        await agent.start()
        run = asyncio.ensure_future(agent.run())
        try:
            await wait_until(
                lambda: status_of(r1, "multi") == status_of(r2, "multi") == "online",
                5,
                "node online on both good routers",
            )
            # the black hole holds its first beat (20 s timeout) and the dead port refuses:
            # neither delays the others, which keep their own interval meanwhile
            await asyncio.sleep(1.5)
            good = agent.link(r1.url), agent.link(r2.url)
            assert all(link.beats_ok >= 3 for link in good), [ln.public() for ln in good]
            assert agent.link(hole).task is not None  # still in flight, never stacked
            assert agent.link(hole).beats_ok == agent.link(hole).beats_failed == 0
            assert agent.link(dead).beats_failed >= 3  # unreachable: tried every beat
            # a router that does not hold our key: refused on that link only
            other = agent.link(foreign.url)
            assert other.beats_ok == 0 and "401" in other.last_error
            assert "multi" not in foreign.router.nodes
            # ... and asked again with back-off, not every beat
            assert other.beats_failed < agent.link(dead).beats_failed
            # the router that asked for a beat every second gets one every second
            times = [t for t, _ in slow.beats]
            assert len(times) >= 2 and all(b - a >= 0.9 for a, b in itertools.pairwise(times))
            assert [b["interval_s"] for _, b in slow.beats] == [INTERVAL] + [1.0] * (
                len(times) - 1
            )
            health = agent.health()
            assert health["connected"] is True and health["routers_connected"] == 3
            assert [r["url"] for r in health["routers"]] == list(urls)

            # need_full is per router: r2 loses the node (say, restarted), only r2 gets
            # the full model list again
            r1_list = r1.router.nodes["multi"].available
            del r2.router.nodes["multi"]
            await wait_until(
                lambda: "multi" in r2.router.nodes
                and r2.router.nodes["multi"].available_names() == {"llama3.2:3b"},
                3,
                "r2 fed in full again",
            )
            assert r1.router.nodes["multi"].available is r1_list  # r1 never re-sent it

            # the dead router comes back on its port: fed again within 2 beats
            back = await make_router(
                [], heartbeat_interval_s=INTERVAL, fleet_key=key, port=dead_port
            )
            tries = agent.link(dead).beats_ok + agent.link(dead).beats_failed
            await wait_until(lambda: status_of(back, "multi") == "online", 3, "back router fed")
            link = agent.link(dead)
            assert link.beats_ok + link.beats_failed - tries <= 2, link.public()
        finally:
            agent.stopping.set()
            await asyncio.wait_for(run, 10)
            await agent.stop()
    # the draining beat went to every router that answers
    assert status_of(r1, "multi") == status_of(r2, "multi") == "draining"
