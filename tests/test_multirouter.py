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
from tests.child_process import ChildProcess
from tests.conftest import RouterFactory
from tests.fake_ollama import FakeOllama
from tests.http_helpers import raw_request, wait_until
from tests.test_dashboard import POLL, browser, open_page  # noqa: F401 (browser: fixture)
from tests.test_node_agent import LLAMA, agent_config, status_of

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
            assert "multi" not in foreign.router.fleet.nodes
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
            r1_list = r1.router.fleet.nodes["multi"].available
            del r2.router.fleet.nodes["multi"]
            await wait_until(
                lambda: "multi" in r2.router.fleet.nodes
                and r2.router.fleet.nodes["multi"].available_names() == {"llama3.2:3b"},
                3,
                "r2 fed in full again",
            )
            assert r1.router.fleet.nodes["multi"].available is r1_list  # r1 never re-sent it

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


# =======================================================================================
# the router's readiness: GET /healthz, draining, drain delay
# =======================================================================================


async def test_healthz_is_ready_until_draining_and_needs_no_api_key(
    make_router: RouterFactory, make_fake: Any
) -> None:
    fake = await make_fake([LLAMA])
    r = await make_router([fake.url], api_keys=["client-key"])
    await r.wait_ready()
    auth = {"authorization": "Bearer client-key"}
    code, hdrs, raw = await raw_request(r.port, "GET", "/healthz")  # no key: a health check
    assert code == 200, raw
    body = json.loads(raw)
    assert body["status"] == "ok" and body["router_id"] == r.router.router_id
    assert body["nodes_online"] == 1 and hdrs["cache-control"] == "no-store"
    assert (await raw_request(r.port, "GET", "/api/tags"))[0] == 401  # the rest needs it
    code, _, raw = await raw_request(r.port, "HEAD", "/healthz")
    assert code == 200 and raw == b""
    code, _, raw = await raw_request(r.port, "POST", "/healthz", b"{}", auth)
    assert code == 405

    r.router.begin_drain()
    code, hdrs, raw = await raw_request(r.port, "GET", "/healthz")
    assert code == 503 and json.loads(raw)["status"] == "draining"
    assert hdrs["connection"] == "close"
    assert (await raw_request(r.port, "HEAD", "/healthz"))[0] == 503
    # still serving while the balancer moves away
    gen = json.dumps({"model": "llama3.2:3b", "prompt": "x", "stream": False}).encode()
    assert (await raw_request(r.port, "POST", "/api/generate", gen, auth))[0] == 200
    _, _, raw = await raw_request(r.port, "GET", "/fleet/status", headers=auth)
    assert json.loads(raw)["routers"]["self"]["draining"] is True


class RouterProcess(ChildProcess):
    """``python herd.py`` as a subprocess; its port read from its first stdout line."""

    def __init__(self, args: list[str], log_path: Path) -> None:
        super().__init__()
        self.args, self.log_path = args, log_path

    async def start(self) -> RouterProcess:
        line = await self.spawn([sys.executable, "herd.py", *self.args], self.log_path)
        assert line.startswith("herd listening on "), (line, self.log_path.read_text())
        self.port = self.port_of(line)
        return self


async def test_sigterm_with_drain_delay_keeps_serving_while_healthz_says_503(
    tmp_path: Path, make_fake: Any
) -> None:
    fake = await make_fake([LLAMA])
    router = RouterProcess(
        ["--host", "127.0.0.1", "--port", "0", "--local-ollama", "off", "--no-mdns",
         "--node", fake.url, "--poll-interval", "0.2", "--drain-delay", "3",
         "--data-dir", str(tmp_path / "r")],
        tmp_path / "router.log",
    )
    await router.start()
    try:
        gen = json.dumps({"model": "llama3.2:3b", "prompt": "x", "stream": False}).encode()
        async with asyncio.timeout(10):
            while (await raw_request(router.port, "POST", "/api/generate", gen))[0] != 200:
                await asyncio.sleep(0.1)
        assert (await raw_request(router.port, "GET", "/healthz"))[0] == 200
        router.signal(signal.SIGTERM)
        async with asyncio.timeout(2):
            while (await raw_request(router.port, "GET", "/healthz"))[0] != 503:
                await asyncio.sleep(0.02)
        # the listener is still open: new connections are served during the delay
        code, hdrs, _ = await raw_request(router.port, "POST", "/api/generate", gen)
        assert code == 200 and hdrs["x-herd-node"]
        assert await router.wait() == 0
        with pytest.raises(OSError):
            await raw_request(router.port, "GET", "/healthz")
        assert "drain delay" in router.log_path.read_text()
    finally:
        await router.close()


# =======================================================================================
# the other routers of the fleet, from mDNS
# =======================================================================================


async def test_fleet_status_lists_the_other_routers_of_the_fleet(
    make_router: RouterFactory,
) -> None:
    fleet = f"t-{uuid.uuid4().hex[:8]}"
    opts: JSON = {"mdns": True, "fleet_id": fleet, "poll_interval_s": 0.2}
    r1 = await make_router([], **opts)
    r2 = await make_router([], **opts)
    stranger = await make_router([], **{**opts, "fleet_id": fleet + "-other"})

    def peers() -> list[JSON]:
        return list(r1.router.fleet.fleet_status(time.time())["routers"]["peers"])

    await wait_until(lambda: [p["state"] for p in peers()] == ["ready"], 15, "r2 seen by r1")
    (peer,) = peers()
    assert peer["router_id"] == r2.router.router_id and peer["url"] == r2.url
    assert peer["version"] == herd.__version__
    status = r1.router.fleet.fleet_status(time.time())["routers"]
    assert status["mdns"] == "on" and status["self"]["router_id"] == r1.router.router_id
    assert stranger.router.router_id not in {p["router_id"] for p in peers()}
    _, _, raw = await raw_request(r1.port, "GET", "/fleet/status")
    assert json.loads(raw)["routers"]["peers"][0]["router_id"] == r2.router.router_id

    r2.router.begin_drain()
    await wait_until(lambda: [p["state"] for p in peers()] == ["draining"], 5, "r2 draining")
    await r2.router.stop()  # a clean stop says goodbye
    await wait_until(lambda: peers() == [], 10, "r2 gone from r1's list")


async def test_without_zeroconf_the_router_runs_and_says_so(
    make_router: RouterFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "zeroconf", None)
    monkeypatch.setitem(sys.modules, "zeroconf.asyncio", None)
    r = await make_router([], mdns=True)
    await wait_until(
        lambda: r.router.fleet.fleet_status(time.time())["routers"]["mdns"] == "unavailable",
        5,
        "mdns marked unavailable",
    )
    assert r.router.fleet.fleet_status(time.time())["routers"]["peers"] == []
    assert (await raw_request(r.port, "GET", "/healthz"))[0] == 200


async def test_a_connection_accepted_as_the_listener_closes_is_served(
    make_router: RouterFactory, make_fake: Any
) -> None:
    """Between ``closing`` and the listener being gone, the loop may still hand over a
    connection the kernel accepted: its request is served (then the connection closes),
    not refused with a 503 a load balancer would pass on to the client."""
    fake = await make_fake([LLAMA])
    r = await make_router([fake.url])
    await r.wait_ready()
    r.router.server.closing = True  # the first thing HttpServer.stop() does
    gen = json.dumps({"model": "llama3.2:3b", "prompt": "x", "stream": False}).encode()
    code, _, raw = await raw_request(r.port, "POST", "/api/generate", gen)
    assert code == 200, raw
    assert r.router.server.rejected_connections == 0


@pytest.mark.browser
async def test_dashboard_lists_the_routers_of_the_fleet(
    make_router: RouterFactory, browser: Any  # noqa: F811 (the fixture imported above)
) -> None:
    fleet = f"t-{uuid.uuid4().hex[:8]}"
    r1 = await make_router([], mdns=True, fleet_id=fleet, poll_interval_s=0.2)
    r2 = await make_router([], mdns=True, fleet_id=fleet, poll_interval_s=0.2)
    page, watch = await open_page(browser, r1.url + "/dashboard" + POLL)
    own, other = r1.router.router_id, r2.router.router_id
    await page.wait_for_selector(f'#router-rows > [data-key="self:{own}"]')
    await page.wait_for_selector(f'#router-rows > [data-key="{other}"] td[data-state="ready"]')
    row = await page.locator(f'#router-rows > [data-key="{other}"]').inner_text()
    assert r2.url in row and herd.__version__ in row
    assert "1 other router(s) of fleet" in await page.locator("#routers-note").inner_text()
    r2.router.begin_drain()
    await page.wait_for_selector(
        f'#router-rows > [data-key="{other}"] td[data-state="draining"]', timeout=8000
    )
    r1.router.begin_drain()
    await page.wait_for_selector(
        f'#router-rows > [data-key="self:{own}"] td[data-state="draining"]'
    )
    assert watch.errors == []


async def test_agent_reports_to_every_router_mdns_lists(make_router: RouterFactory) -> None:
    """mDNS on 127.0.0.1 only: every router of the agent's fleet gets its beats, a router
    that appears is joined, one that leaves (goodbye) is dropped; other fleets are not fed."""
    fleet = f"t-{uuid.uuid4().hex[:8]}"
    opts: JSON = {"heartbeat_interval_s": INTERVAL, "mdns": True, "fleet_id": fleet}
    r1 = await make_router([], **opts)
    r2 = await make_router([], **opts)
    stranger = await make_router([], **{**opts, "fleet_id": fleet + "-x"})
    async with FakeOllama([LLAMA]) as fake:
        config = agent_config(None, fake, "everywhere", fleet_id=fleet,
                              mdns_interfaces=("127.0.0.1",))
        agent = herd_node.Agent(config)
        await agent.start()
        run = asyncio.ensure_future(agent.run())
        try:
            await wait_until(
                lambda: status_of(r1, "everywhere") == status_of(r2, "everywhere") == "online",
                15,
                "online on both routers",
            )
            r3 = await make_router([], **opts)
            await wait_until(lambda: status_of(r3, "everywhere") == "online", 15, "r3 joined")
            assert status_of(r1, "everywhere") == status_of(r2, "everywhere") == "online"
            await r1.router.stop()  # goodbye: the agent stops reporting there
            await wait_until(lambda: len(agent.links) == 2, 10, "r1 dropped")
            assert {ln.router_id for ln in agent.links.values()} == {
                r2.router.router_id,
                r3.router.router_id,
            }
            assert all(ln.source == "mdns" for ln in agent.links.values())
            assert "everywhere" not in stranger.router.fleet.nodes
        finally:
            agent.stopping.set()
            await asyncio.wait_for(run, 10)
            await agent.stop()
