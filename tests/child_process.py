"""A program under test (herd.py, herd_node.py, nginx, haproxy) as an asyncio subprocess:
started from the repository root with unbuffered output, stderr to a log file, and its
first stdout line (``... listening on HOST:PORT``) handed back to the caller."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class ChildProcess:
    wait_s: float = 20.0  # ``wait()``'s default timeout

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    async def spawn(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                    *, first_line_s: float | None = 20.0) -> str:
        """Start ``argv``; return its first stdout line, read within ``first_line_s``
        (None: stdout goes to the log as well and nothing is read)."""
        with log_path.open("ab") as log_file:
            self.proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
                stdout=asyncio.subprocess.PIPE if first_line_s is not None else log_file,
                stderr=log_file,
            )
        if first_line_s is None:
            return ""
        assert self.proc.stdout is not None
        async with asyncio.timeout(first_line_s):
            return (await self.proc.stdout.readline()).decode()

    @staticmethod
    def port_of(line: str) -> int:
        """The port at the end of a ``... listening on HOST:PORT`` line."""
        return int(line.rsplit(":", 1)[1])

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def wait(self, timeout: float | None = None) -> int:
        assert self.proc is not None
        async with asyncio.timeout(self.wait_s if timeout is None else timeout):
            return await self.proc.wait()

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def start_herd(
    args: list[str], env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, int]:
    """``python herd.py`` on 127.0.0.1, an OS-chosen port, no local Ollama, plus ``args``;
    stdout and stderr piped. The process and the port from its first line."""
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


async def help_text(script: str) -> str:
    """``python <script> --help``'s output (``script`` in the repository root)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / script), "--help", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await proc.communicate()
    return out.decode()
