"""Router side of the heartbeat protocol: validation, signatures, replay, takeover."""

from __future__ import annotations

import json
import time

import herd
from tests.conftest import RouterFactory
from tests.http_helpers import beat, raw_request

KEY = "s3cret-fleet-key"


async def test_signed_beats_and_replay(make_router: RouterFactory) -> None:
    r = await make_router([], fleet_key=KEY)
    # an Ollama on another machine: not this machine's agent, so it must sign (consent)
    raw = json.dumps(beat(ollama_url="http://10.0.0.9:11434")).encode()
    status, _, _ = await raw_request(r.port, "POST", "/heartbeat", raw)
    assert status == 401  # unsigned
    bad = {"x-herd-signature": herd.sign("other-key", int(time.time()), raw)}
    status, _, _ = await raw_request(r.port, "POST", "/heartbeat", raw, headers=bad)
    assert status == 401
    good = {"x-herd-signature": herd.sign(KEY, int(time.time()), raw)}
    status, headers, data = await raw_request(r.port, "POST", "/heartbeat", raw, headers=good)
    assert status == 200 and json.loads(data)["ok"] is True
    assert herd.verify_signature(KEY, headers["x-herd-signature"], data, time.time())
    status, _, data = await raw_request(r.port, "POST", "/heartbeat", raw, headers=good)
    assert status == 409 and "replayed" in json.loads(data)["error"]
    stale = {"x-herd-signature": herd.sign(KEY, int(time.time()) - 3600, raw)}
    status, _, _ = await raw_request(r.port, "POST", "/heartbeat", raw, headers=stale)
    assert status == 401


async def test_malformed_beats_change_nothing(make_router: RouterFactory) -> None:
    r = await make_router([])
    for body in (
        b"{not json",
        json.dumps(beat(node_id="bad id!")).encode(),
        json.dumps(beat(ollama={"loaded": "nope"})).encode(),
        json.dumps(beat(interval_s=-1)).encode(),
        json.dumps({"node_id": "x"}).encode(),
    ):
        status, _, data = await raw_request(r.port, "POST", "/heartbeat", body)
        assert status == 400, data
    assert r.router.fleet.nodes == {}


async def test_takeover_from_another_address_is_refused(make_router: RouterFactory) -> None:
    r = await make_router([])
    node = r.router.fleet.nodes.setdefault(
        "studio", herd.Node(node_id="studio", url="http://x:1", source="agent")
    )
    node.status, node.agent_addr, node.last_seen = "online", "10.9.9.9", time.time()
    status, _, data = await raw_request(r.port, "POST", "/heartbeat", json.dumps(beat()).encode())
    assert status == 409 and "another address" in json.loads(data)["error"]
    assert r.router.fleet.nodes["studio"].url == "http://x:1"


async def test_draining_node_leaves_at_once(make_router: RouterFactory) -> None:
    r = await make_router([])
    await raw_request(r.port, "POST", "/heartbeat", json.dumps(beat()).encode())
    assert r.router.fleet.nodes["studio"].status == "online"
    await raw_request(r.port, "POST", "/heartbeat", json.dumps(beat(draining=True)).encode())
    assert r.router.fleet.nodes["studio"].status == "draining"
