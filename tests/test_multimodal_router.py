"""Router side of image generation and speech-to-text, against a minimal fake agent service.

The node agent's real backends (faster-whisper, command templates) are tested in
tests/test_multimodal.py; here the agent's HTTP service is a small h11 fake so that routing,
toggles, errors, OpenAI translation and streaming uploads are pinned down on their own.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import h11
import openai
import pytest

from tests.conftest import RouterFactory, RunningRouter
from tests.http_helpers import beat, multipart, raw_request, read_body, serve_h11

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64


class FakeAgentService:
    """Answers /api/generate-image with PNG bytes and /api/transcribe with a transcript."""

    def __init__(self) -> None:
        self.port = 0
        self.server: asyncio.Server | None = None
        self.uploads: list[int] = []
        self.fail_next = 0
        self.fail_status, self.fail_body = 500, b'{"error":"backend crashed"}'

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def one(conn: h11.Connection, req: h11.Request) -> bool:
            size = len(await read_body(conn, reader))
            if self.fail_next:
                self.fail_next -= 1
                status, ctype, body = self.fail_status, b"application/json", self.fail_body
            elif req.target.startswith(b"/api/generate-image"):
                status, ctype, body = 200, b"image/png", PNG
            else:
                self.uploads.append(size)
                status, ctype = 200, b"application/json"
                body = json.dumps(
                    {
                        "text": "hello from the fleet",
                        "language": "en",
                        "chunks": [{"text": "hello from the fleet", "start": 0.0, "end": 1.5}],
                    }
                ).encode()
            headers = [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
            for event in (
                h11.Response(status_code=status, headers=headers),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                writer.write(conn.send(event) or b"")
            await writer.drain()
            return True

        await serve_h11(reader, writer, one)


async def register(r: RunningRouter, node_id: str, service: FakeAgentService) -> None:
    capabilities = {
        "image": [{"name": "z-image-turbo", "backend": "command"}],
        "stt": [{"name": "whisper-tiny.en", "backend": "faster-whisper"}],
        "service_url": f"http://127.0.0.1:{service.port}",
    }
    body = beat(node_id, interval_s=30, capabilities=capabilities)
    status, _, _ = await raw_request(r.port, "POST", "/heartbeat", json.dumps(body).encode())
    assert status == 200


@pytest.fixture
async def mm(make_router: RouterFactory) -> AsyncIterator[tuple[RunningRouter, Any, Any]]:
    a, b = FakeAgentService(), FakeAgentService()
    await a.start()
    await b.start()
    r = await make_router([])
    await register(r, "studio", a)
    await register(r, "laptop", b)
    yield r, a, b
    await a.stop()
    await b.stop()


async def test_image_generation_png_and_retry(mm: Any) -> None:
    r, a, b = mm
    a.fail_next = b.fail_next = 0
    status, headers, data = await raw_request(
        r.port,
        "POST",
        "/api/generate-image",
        b'{"model":"z-image-turbo","prompt":"a red fox","width":64,"height":64}',
    )
    assert status == 200 and headers["content-type"] == "image/png" and data == PNG
    first = headers["x-herd-node"]
    (a if first == "studio" else b).fail_next = 1
    status, headers, _ = await raw_request(
        r.port, "POST", "/api/generate-image", b'{"model":"z-image-turbo","prompt":"x"}'
    )
    assert status == 200 and headers["x-herd-retries"] in ("0", "1")


async def test_image_errors_and_toggle(mm: Any) -> None:
    r, _, _ = mm
    status, _, data = await raw_request(
        r.port, "POST", "/api/generate-image", b'{"model":"sdxl","prompt":"x"}'
    )
    assert status == 404 and "z-image-turbo" in json.loads(data)["error"]
    status, _, data = await raw_request(r.port, "POST", "/api/generate-image", b'{"model":1}')
    assert status == 400
    r.router.settings["image_generation"] = False
    status, _, data = await raw_request(r.port, "POST", "/api/generate-image", b'{"prompt":"x"}')
    assert status == 503 and "image_generation" in json.loads(data)["error"]


async def test_openai_images(mm: Any) -> None:
    r, _, _ = mm
    client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0)
    result = await client.images.generate(
        model="z-image-turbo", prompt="a fox", size="64x64", response_format="b64_json"
    )
    assert result.data and base64.b64decode(result.data[0].b64_json or "") == PNG
    await client.close()


async def test_transcribe_native_and_openai(mm: Any) -> None:
    r, a, b = mm
    audio = b"RIFF" + b"\x01" * 300_000
    body = multipart({"model": "whisper-tiny.en"}, audio)
    status, _headers, data = await raw_request(
        r.port,
        "POST",
        "/api/transcribe",
        body,
        headers={"content-type": "multipart/form-data; boundary=herdBoundary7"},
    )
    assert status == 200, data
    out = json.loads(data)
    assert out["text"] == "hello from the fleet" and out["chunks"][0]["end"] == 1.5
    assert max(a.uploads + b.uploads) == len(body)  # the whole upload reached the node
    client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="x", max_retries=0)
    tr = await client.audio.transcriptions.create(
        model="whisper-tiny.en", file=("a.wav", audio, "audio/wav")
    )
    assert tr.text == "hello from the fleet"
    text = await client.audio.transcriptions.create(
        model="whisper-tiny.en", file=("a.wav", audio, "audio/wav"), response_format="srt"
    )
    assert "00:00:00,000 --> 00:00:01,500" in str(text)
    with pytest.raises(openai.NotFoundError):
        await client.audio.transcriptions.create(model="nope", file=("a.wav", audio, "audio/wav"))
    await client.close()
    await r.router.store.flush()
    kinds = {row["kind"] for row in await r.router.store.traces(limit=10)}
    assert "stt" in kinds


async def test_transcribe_rejects_non_multipart(mm: Any) -> None:
    r, _, _ = mm
    status, _, data = await raw_request(r.port, "POST", "/api/transcribe", b'{"x":1}')
    assert status == 400 and "multipart" in json.loads(data)["error"]


async def test_jobs_go_through_the_one_attempt_loop_and_relay(mm: Any) -> None:
    """Image and speech jobs share inference's attempt loop and relay (issue 14): their
    answer carries the same herd headers (the request id too), and a job that fails on
    every node ends with one terminal ``failed`` trace row after the ``retried`` ones."""
    r, a, b = mm
    body = b'{"model":"z-image-turbo","prompt":"x","width":16,"height":16}'
    status, headers, data = await raw_request(
        r.port, "POST", "/api/generate-image", body, {"x-request-id": "job-ok"}
    )
    assert status == 200 and data == PNG
    assert headers["x-request-id"] == "job-ok"
    assert headers["x-herd-model"] == "z-image-turbo:latest"
    a.fail_next = b.fail_next = 1
    status, headers, data = await raw_request(
        r.port, "POST", "/api/generate-image", body, {"x-request-id": "job-bad"}
    )
    # the last node's failure, in the client's dialect (as inference relays a node's 5xx)
    assert status == 500 and "backend crashed" in json.loads(data)["error"]
    await r.router.store.flush()
    rows = [t for t in await r.router.store.traces(limit=20) if t["request_id"] == "job-bad"]
    statuses = sorted(t["status"] for t in rows)
    assert statuses == ["failed", "retried", "retried"], rows
    assert all(t["kind"] == "image" for t in rows)
