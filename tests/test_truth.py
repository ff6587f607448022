"""Issue 13, "tell the truth": failures blamed on the right party, error texts kept,
an empty fleet said out loud, the OpenAI dialect's not-found and retry hints.

Pure tables for the classification; the rest through a real router on loopback in front of
fake Ollama nodes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import openai
import pytest

import herd
import scoring
from tests.conftest import FakeFactory, RouterFactory, RunningRouter
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import raw_request

LLAMA = FakeModel(name="llama3.2:3b", size=2_000_000_000, family="llama")
ROOT = Path(__file__).resolve().parent.parent
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]


# ------------------------------------------------------------ 1. one classification ----

# (status, body, node lists the model, no answer) -> (kind, node's fault, trace status)
CLASSIFY = [
    (200, b"", True, "", ("ok", False, "completed")),
    (204, b"", True, "", ("ok", False, "completed")),
    (304, b"", True, "", ("ok", False, "completed")),
    (400, b'{"error":"\\"llama3.2:3b\\" does not support tools"}', True, "",
     ("status_4xx", False, "client_error")),
    (401, b"", True, "", ("status_4xx", False, "client_error")),
    (413, b"", True, "", ("status_4xx", False, "client_error")),
    (422, b"{}", True, "", ("status_4xx", False, "client_error")),
    (404, b'{"error":"model \\"x\\" not found, try pulling it first"}', True, "",
     ("model_not_found", True, "failed")),
    (404, b'{"error":"model \\"x\\" not found"}', False, "", ("status_4xx", False, "client_error")),
    (404, b"404 page not found", True, "", ("model_not_found", True, "failed")),
    (404, b"", True, "", ("status_4xx", False, "client_error")),
    (408, b"", True, "", ("status_5xx", True, "failed")),
    (429, b"", True, "", ("busy", True, "failed")),
    (503, b'{"error":"server busy, please try again.  maximum pending requests exceeded"}',
     True, "", ("busy", True, "failed")),
    (503, b"", True, "", ("busy", True, "failed")),
    (500, b'{"error":"server busy"}', True, "", ("busy", True, "failed")),
    (500, b'{"error":"llama runner process has terminated"}', True, "",
     ("status_5xx", True, "failed")),
    (502, b"", True, "", ("status_5xx", True, "failed")),
    (101, b"", True, "", ("status_5xx", True, "failed")),
    (0, b"", True, "connect", ("connect", True, "failed")),
    (0, b"", True, "reset", ("reset", True, "failed")),
    (0, b"", True, "timeout_first_byte", ("timeout_first_byte", True, "failed")),
    (0, b"", True, "", ("reset", True, "failed")),
    (0, b"", True, "gremlins", ("reset", True, "failed")),
]


@pytest.mark.parametrize(("status", "body", "listed", "no_answer", "want"), CLASSIFY)
def test_classify_answer_table(
    status: int, body: bytes, listed: bool, no_answer: str, want: tuple[str, bool, str]
) -> None:
    got = scoring.classify_answer(status, body, node_lists_model=listed, no_answer=no_answer)
    assert (got.kind, got.node_fault, got.trace_status) == want
    assert got.kind == "ok" or got.kind in scoring.FAILURE_KINDS
    # retried exactly when it is the node's failure (and budget remains)
    if got.kind != "ok":
        retry = scoring.retry_decision(0, got.kind, False, scoring.Policy()).retry
        assert retry == got.node_fault


def test_every_trace_status_is_documented() -> None:
    """The trace status set in store.STATUSES is the one ARCHITECTURE.md lists."""
    import store

    text = (herd.Path(herd.__file__).with_name("ARCHITECTURE.md")).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| `status` |"))
    documented = {w.strip("`") for w in row.split("|")[3].split() if w.startswith("`")}
    assert documented == set(store.STATUSES)


async def two_nodes(
    make_router: RouterFactory, make_fake: FakeFactory
) -> tuple[RunningRouter, FakeOllama, FakeOllama]:
    """A router in front of two ready nodes that both hold LLAMA."""
    a = await make_fake([LLAMA], tokens_per_s=0)
    b = await make_fake([LLAMA], tokens_per_s=0)
    r = await make_router([a.url, b.url])
    await r.wait_ready(nodes=2)
    return r, a, b


async def chat(r: RunningRouter, body: dict[str, Any], path: str = "/api/chat") -> Any:
    return await raw_request(r.port, "POST", path, json.dumps(body).encode())


async def test_client_4xx_is_not_the_nodes_failure(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    """Five requests the node refuses with 400 (tools on a model without them) and four good
    ones: health shows no error rate, no breaker moves, the node's failures stay 0, and each
    trace says it was the client's error with the node's own text."""
    fake = await make_fake([LLAMA], tokens_per_s=0)
    r = await make_router([fake.url])
    await r.wait_ready()
    msg = [{"role": "user", "content": "hi"}]
    for _ in range(5):
        status, headers, body = await chat(
            r, {"model": "llama3.2:3b", "messages": msg, "tools": TOOLS, "stream": False}
        )
        assert status == 400
        assert json.loads(body) == {"error": '"llama3.2:3b" does not support tools'}
        assert headers["x-herd-retries"] == "0"
    for _ in range(4):
        status, _, _ = await chat(r, {"model": "llama3.2:3b", "messages": msg, "stream": False})
        assert status == 200
    (nid,) = r.router.fleet.nodes
    assert len(fake.requests_to("/api/chat")) == 9  # a client error is never retried
    assert all(b.state == "closed" and b.consecutive_failures == 0
               for b in r.router.fleet.breakers.values())
    stats = r.router.fleet.stats.get((nid, "llama3.2:3b"))
    assert stats is not None and stats.failures == 0

    await r.router.store.flush()
    traces = await r.router.store.traces(50)
    refused = [t for t in traces if t["http_status"] == 400]
    assert len(refused) == 5
    for t in refused:
        assert t["status"] == "client_error" and t["node_id"] == nid
        assert t["error_message"] == '"llama3.2:3b" does not support tools'

    (row,) = await r.router.store.node_model_stats(days=1, now=time.time())
    assert (row["errors"], row["failures"], row["client_errors"]) == (0, 0, 5)
    assert (row["requests"], row["attempts"]) == (9, 9)

    r.router.dashboard._analytics_cache.clear()
    status, _, body = await raw_request(r.port, "GET", "/dashboard/api/health")
    health = json.loads(body)
    assert status == 200
    assert health["vitals"]["errors_24h"] == 0
    bad = [c for c in health["checks"] if c["severity"] != "ok"]
    assert not [c for c in bad if c["id"] in ("high_error_rate", "node_unreachable",
                                               "breaker_open")], bad
    for c in bad:
        assert "out of memory" not in c["fix"] and "OLLAMA_HOST" not in c["fix"], c


# ------------------------------------------------------------ 2. error texts kept -------


async def test_every_non_2xx_trace_keeps_the_error_text_bounded(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    r, a, b = await two_nodes(make_router, make_fake)
    gen = {"model": "llama3.2:3b", "prompt": "x", "stream": False}

    long_error = "bad option " + "y" * 5000
    for fake in (a, b):
        fake.fail_next(400, long_error, path="/api/generate")
    status, _, body = await chat(r, gen, "/api/generate")
    assert status == 400 and json.loads(body)["error"] == long_error  # client gets it whole
    for fake in (a, b):
        fake._faults.clear()  # the node not chosen still holds its fault

    crash = "llama runner process has terminated: " + "z" * 3000
    for fake in (a, b):  # both nodes crash: retried once, then the client gets the 500
        fake.fail_next(500, crash, path="/api/generate")
    status, _, body = await chat(r, gen, "/api/generate")
    assert status == 500

    status, _, body = await chat(r, {"model": "ghost:1b", "prompt": "x"}, "/api/generate")
    assert status == 404

    await r.router.store.flush()
    traces = await r.router.store.traces(50)
    non_2xx = [t for t in traces if t["status"] != "completed" and t["status"] != "retried"]
    assert len(non_2xx) == 3
    for t in non_2xx:
        assert t["error_message"], t
        assert len(str(t["error_message"])) <= herd.TRACE_ERROR_MAX
    by_status = {t["http_status"]: str(t["error_message"]) for t in non_2xx}
    assert by_status[400].startswith("bad option yyy") and len(by_status[400]) == 1000
    assert "llama runner process has terminated" in by_status[500]
    assert "ghost:1b" in by_status[404] and "not found" in by_status[404]
    retried = [t for t in traces if t["status"] == "retried"]
    assert retried and all("llama runner" in str(t["error_message"]) for t in retried)


def test_error_text_extracts_both_dialects_and_bounds() -> None:
    assert herd.error_text(b'{"error":"boom"}') == "boom"
    assert herd.error_text(b'{"error":{"message":"nope","type":"x"}}') == "nope"
    assert herd.error_text(b"plain text\n") == "plain text"
    assert herd.error_text(b"") == ""
    assert herd.error_text(b'{"error": 3}') == '{"error": 3}'
    cut = herd.error_text(b"z" * 5000, 100)
    assert len(cut) == 100 and cut.endswith("\u2026")


# ------------------------------------------------------------ 3. empty fleet ------------


def test_empty_fleet_is_a_critical_card_with_the_fix() -> None:
    for nodes in ((), (scoring.NodeFacts("a", status="offline"),)):
        report = scoring.health_checks(scoring.HealthInput(now=1e9, nodes=nodes))
        (card,) = [c for c in report.checks if c.id == "no_nodes_online"]
        assert card.severity == "critical"
        assert "herd-node" in card.fix and "--node" in card.fix
        assert report.score < 100
    live = scoring.health_checks(
        scoring.HealthInput(now=1e9, nodes=(scoring.NodeFacts("a", status="degraded"),))
    )
    assert not [c for c in live.checks if c.id == "no_nodes_online"]


async def test_empty_fleet_through_the_router(
    make_router: RouterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="herd")
    # a loopback port nothing listens on stands for "no local Ollama"
    r = await make_router([], local_ollama="http://127.0.0.1:9")
    async with asyncio.timeout(10):
        while not any("no Ollama answered at http://127.0.0.1:9" in m for m in caplog.messages):
            await asyncio.sleep(0.02)
    line = next(m for m in caplog.messages if "no Ollama answered" in m)
    assert "no node is configured" in line and "herd-node" in line and "--node" in line

    status, _, body = await raw_request(r.port, "GET", "/dashboard/api/health")
    health = json.loads(body)
    assert health["score"] < 100
    assert any(c["id"] == "no_nodes_online" and c["severity"] == "critical"
               for c in health["checks"])

    status, _, body = await chat(r, {"model": "llama3.2:3b", "prompt": "x"}, "/api/generate")
    assert status == 404
    assert "fleet is empty" in json.loads(body)["error"]
    status, _, body = await chat(
        r, {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "x"}]},
        "/v1/chat/completions",
    )
    err = json.loads(body)["error"]
    assert status == 404 and "fleet is empty" in err["message"]
    assert err["type"] == "not_found_error"


async def test_no_node_and_no_probe_says_so_at_start(
    make_router: RouterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="herd")
    await make_router([])  # conftest: local_ollama=None
    assert any("no node is configured" in m and "fleet is empty" in m for m in caplog.messages)


async def test_a_model_missing_from_a_live_fleet_is_a_plain_404(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    fake = await make_fake([LLAMA], tokens_per_s=0)
    r = await make_router([fake.url])
    await r.wait_ready()
    status, _, body = await chat(r, {"model": "ghost:1b", "prompt": "x"}, "/api/generate")
    assert status == 404 and "fleet is empty" not in json.loads(body)["error"]


# ------------------------------------------------------------ 4. OpenAI dialect ---------


async def test_openai_unknown_model_is_not_found_error(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    fake = await make_fake([LLAMA], tokens_per_s=0)
    r = await make_router([fake.url])
    await r.wait_ready()
    client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        await client.chat.completions.create(
            model="ghost:1b", messages=[{"role": "user", "content": "x"}]
        )
    assert info.value.status_code == 404
    body = info.value.body
    assert isinstance(body, dict) and body["type"] == "not_found_error"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("ghost:1b")
    await client.close()


async def test_openai_failure_after_herd_retried_says_do_not_retry(
    make_router: RouterFactory, make_fake: FakeFactory
) -> None:
    r, a, b = await two_nodes(make_router, make_fake)
    body = {"model": "llama3.2:3b", "messages": [{"role": "user", "content": "x"}]}
    for fake in (a, b):
        fake.fail_next(500, "llama runner process has terminated", path="/v1/chat/completions")
    status, headers, _ = await chat(r, body, "/v1/chat/completions")
    assert status == 500 and headers["x-herd-retries"] == "1"
    assert headers["x-should-retry"] == "false"

    # the official SDK believes it: one call, no extra attempts on top of herd's own retry
    client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=2)
    a.reset_stats()
    b.reset_stats()
    for fake in (a, b):
        fake.fail_next(500, "llama runner process has terminated", path="/v1/chat/completions")
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(**body)
    sent = len(a.requests_to("/v1/chat/completions")) + len(b.requests_to("/v1/chat/completions"))
    assert sent == 2
    await client.close()



async def test_v6_adds_client_errors_to_an_old_store_in_one_log_line(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A v4 latency.db (rollups without ``client_errors``) upgrades in place; a client error
    then counts as an attempt and a client error, never as an error or a failure. The
    upgrade is one log line that says from which version to which (point 6)."""
    import store

    data = tmp_path / "data"
    data.mkdir()
    conn = store._connect_writer(data / "latency.db")
    assert store._migrate(conn, store.MIGRATIONS[:4]) == 4
    for table in ("rollups", "fleet_rollups"):  # the v4 schema had no such column
        conn.execute(f"ALTER TABLE {table} DROP COLUMN client_errors")
    conn.close()

    caplog.set_level(logging.INFO, logger="herd.store")
    s = store.Store(data, prune_interval_s=None)
    await s.open()
    try:
        now = time.time()
        for i, (status, http) in enumerate([("client_error", 400), ("failed", 500),
                                            ("completed", 200)]):
            s.record_trace(store.TraceRecord(f"r{i}", now, model="m", node_id="a",
                                             status=status, http_status=http))
        await s.flush()
        (row,) = await s.node_model_stats(days=1, now=now)
        assert (row["attempts"], row["client_errors"], row["errors"], row["failures"]) == (
            3, 1, 1, 1)
        (trend,) = [t for t in await s.trends(hours=1, now=now) if t["attempts"]]
        assert trend["client_errors"] == 1
    finally:
        await s.close()
    migrated = [m for m in caplog.messages if m.startswith("store.migrated")]
    assert migrated == [f"store.migrated: schema v4 -> v{len(store.MIGRATIONS)}"]

    caplog.clear()
    fresh = store.Store(tmp_path / "fresh", prune_interval_s=None)
    await fresh.open()
    await fresh.close()
    assert [m for m in caplog.messages if m.startswith("store.migrated")] == [
        f"store.migrated: schema v0 -> v{len(store.MIGRATIONS)}"
    ]


# ------------------------------------------------------------ 5. non-HTTP bytes ---------

REQUEST_LINES = [
    (b"", True),
    (b"G", True),
    (b"GET", True),
    (b"GET ", True),
    (b"GET /api/tags", True),
    (b"GET /api/tags ", True),
    (b"GET /api/tags HT", True),
    (b"GET /api/tags HTTP/1.", True),
    (b"GET /api/tags HTTP/1.1", True),
    (b"GET /api/tags HTTP/1.1\r", True),
    (b"GET /api/tags HTTP/1.1\r\nHost: x\r\n", True),
    (b"\r\nPOST /api/chat HTTP/1.1\r\n", True),  # an empty line before it is allowed
    (b"M-SEARCH * HTTP/1.1\r\n", True),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", False),  # a TLS ClientHello
    (b"\x00", False),
    (b" GET / HTTP/1.1", False),
    (b"GET  /", False),
    (b"GET /\x7f", False),
    (b"GET / HTTP/2", True),  # h11 answers 505 itself once the line is complete
    (b"GET / HTTP/2x", False),
    (b"GET / XTTP", False),
    (b"GET / HTTP/1.1x", False),
    (b"A" * 32, True),
    (b"A" * 33, False),
    (b"hello world\n", False),  # a complete first line that is no request line
    (b"GET /\r\n", False),  # HTTP/0.9 is not spoken here
]


@pytest.mark.parametrize(("buf", "ok"), REQUEST_LINES)
def test_request_line_possible_table(buf: bytes, ok: bool) -> None:
    assert herd.request_line_possible(buf) is ok


async def read_all(reader: asyncio.StreamReader, timeout: float) -> bytes:
    async with asyncio.timeout(timeout):
        return await reader.read(-1)


async def test_bytes_that_cannot_be_http_are_refused_at_once(
    make_router: RouterFactory,
) -> None:
    """512 random bytes with no line end: 400 and close within a second or two, not the
    30 s header deadline. A slow but valid request line is still waited for."""
    import random

    r = await make_router([])
    noise = random.Random(13).randbytes(512).replace(b"\n", b"x")
    # (h11 refuses a TLS ClientHello by itself; random noise it would hold for 30 s)
    for garbage in (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + noise[:100], noise):
        reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
        writer.write(garbage)
        await writer.drain()
        data = await read_all(reader, 5.0)  # EOF: the router closed the connection
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), data[:200]
        assert b"connection: close" in head.lower()
        assert json.loads(body)["error"]
    assert "not an HTTP/1.x request" in json.loads(body)["error"] or garbage[0] == 0x16

    # a valid request line arriving in pieces is not refused
    reader, writer = await asyncio.open_connection("127.0.0.1", r.port)
    for piece in (b"GE", b"T /api/ver", b"sion HTTP/1", b".1\r\nHost: 127.0.0.1\r\n",
                  b"Connection: close\r\n\r\n"):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.05)
    data = await read_all(reader, 5.0)
    writer.close()
    assert data.startswith(b"HTTP/1.1 503 ")  # the empty fleet has no version yet: a real answer


# ------------------------------------------------------------ 6. noise and small truths -


async def test_context_protection_rewrites_only_what_spares_a_reload(
    make_router: RouterFactory, make_fake: FakeFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A request without num_ctx to a resident model reaches the node byte for byte (Ollama
    would not reload for it) and logs nothing at INFO; a smaller num_ctx that would force a
    reload is still rewritten, and that is logged at DEBUG only."""
    caplog.set_level(logging.DEBUG, logger="herd")
    long_ctx = FakeModel(name="llama3.2:3b", size=2_000_000_000, context_length=32768)
    fake = await make_fake([long_ctx], tokens_per_s=0, default_num_ctx=8192)
    r = await make_router([fake.url])
    await r.wait_ready()
    await raw_request(fake.port, "POST", "/api/generate", b'{"model":"llama3.2:3b"}')  # load
    await r.router.fleet.refresh_node(next(iter(r.router.fleet.nodes.values())))

    plain = b'{"model":"llama3.2:3b","prompt":"x","stream":false}'
    status, _, _ = await raw_request(r.port, "POST", "/api/generate", plain)
    assert status == 200
    assert fake.requests_to("/api/generate")[-1].body == plain
    assert not [x for x in caplog.records if "context protection" in x.getMessage()]

    small = b'{"model":"llama3.2:3b","prompt":"x","stream":false,"options":{"num_ctx":2048}}'
    loads = len(fake.load_events)
    status, _, _ = await raw_request(r.port, "POST", "/api/generate", small)
    assert status == 200 and len(fake.load_events) == loads
    assert fake.requests_to("/api/generate")[-1].json()["options"]["num_ctx"] == 8192
    said = [x for x in caplog.records if "context protection" in x.getMessage()]
    assert said and all(x.levelno == logging.DEBUG for x in said)


@pytest.mark.parametrize(("program", "name"), [("herd.py", "herd"), ("herd_node.py", "herd-node")])
async def test_version_flag(program: str, name: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / program), "--version",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(ROOT),
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err
    assert out.decode().strip() == f"{name} {herd.__version__}"


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.5.6.7", True), ("::1", True), ("[::1]", True),
     ("localhost", True), ("0.0.0.0", False), ("::", False), ("", False),
     ("192.168.1.5", False), ("router.lan", False)],
)
def test_is_loopback_host(host: str, loopback: bool) -> None:
    assert herd.is_loopback_host(host) is loopback


async def test_non_loopback_without_api_key_warns_once(
    make_router: RouterFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="herd")
    # listening on every address (port 0); nothing is sent to anything but loopback
    await make_router([], host="0.0.0.0")
    warned = [m for m in caplog.messages if "no API key" in m]
    assert len(warned) == 1 and "--api-key" in warned[0]
    caplog.clear()
    await make_router([], host="0.0.0.0", api_keys=["k"])
    await make_router([])  # loopback
    assert not [m for m in caplog.messages if "no API key" in m]


async def test_client_4xx_from_an_image_agent_is_not_its_failure(
    make_router: RouterFactory,
) -> None:
    from tests.test_multimodal_router import FakeAgentService, register

    agent = FakeAgentService()
    await agent.start()
    try:
        r = await make_router([])
        await register(r, "studio", agent)
        agent.fail_status, agent.fail_body = 400, b'{"error":"width must be a multiple of 8"}'
        agent.fail_next = 1
        status, headers, body = await raw_request(
            r.port, "POST", "/api/generate-image", b'{"model":"z-image-turbo","prompt":"x"}'
        )
        assert status == 400 and json.loads(body)["error"] == "width must be a multiple of 8"
        assert headers["x-herd-retries"] == "0"
        queues = [
            q for q in r.router.admission.queues.values() if q.model.startswith("z-image-turbo")
        ]
        assert queues and all(q.failed == 0 and q.done == 1 for q in queues)
        await r.router.store.flush()
        (t,) = await r.router.store.traces(5)
        assert (t["status"], t["http_status"]) == ("client_error", 400)
        assert t["error_message"] == "width must be a multiple of 8"
    finally:
        await agent.stop()
