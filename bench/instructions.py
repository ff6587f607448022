"""herd's own cost in instructions, not seconds: herd vs the bare h11 relay under callgrind.

    python bench/instructions.py                       # ~3 min, prints a table, exit 1 on a miss
    python bench/instructions.py --baseline DIR        # also another checkout's herd.py (e.g.
                                                       # `git archive main | tar -x -C DIR`)
    python bench/instructions.py --nodes 20            # herd over 20 nodes x 8 models

CPU seconds per request (bench/proxy_overhead.py) move with whatever else runs on the
machine; the number of instructions a process executes per request does not. Each system
under test (herd, the bare relay of proxy_overhead, optionally a baseline herd) runs in its
own process under ``valgrind --tool=callgrind``, twice: once for N1 requests and once for
N2. Instructions per request are (Ir(N2) - Ir(N1)) / (N2 - N1), so start-up, imports and
shutdown cancel out; what is left varies about +-3 % run to run (work driven by the wall
clock: the store's flush timer, the collector, the 1 s monitor tick). The load is N small
non-streaming ``/api/generate`` requests from one keep-alive client (``--clients`` more).

* one node (default): a fake Ollama node (tests/fake_ollama.py, 12-token answers), the
  relay and herd in front of it; target herd ≤ 1.5x the relay (issue 16's CPU target);
* ``--nodes 20``: 20 fake nodes x 8 models (one process), the requests spread over the 8
  models; shown beside the one-node figure of the relay (no target: the relay does not
  route).

valgrind must be installed (apt-get install valgrind); without it the script says so and
exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.lib.common import Proc, ready_line, serve_until_signal, use_uvloop  # noqa: E402

TARGET_RATIO = 1.5
MODELS = [f"m{j}:1b" for j in range(8)]
SMALL_MODEL = "llama3.2:3b"


# =======================================================================================
# Roles (each its own process; herd and the relay run under callgrind)
# =======================================================================================


async def run_nodes(count: int) -> None:
    from tests.fake_ollama import FakeModel, FakeOllama

    names = [SMALL_MODEL] if count == 1 else MODELS
    fakes = []
    for _ in range(count):
        fake = FakeOllama([FakeModel(m, size=1_000_000_000) for m in names], tokens_per_s=0,
                          prompt_tokens_per_s=0, load_delay_s=0, num_parallel=32,
                          max_queue=100_000, response_tokens=12)
        await fake.start()
        fakes.append(fake)

    async def stop() -> None:
        for fake in fakes:
            await fake.stop()

    await serve_until_signal(" ".join(str(f.port) for f in fakes), stop)


async def run_herd(root: str, urls: list[str], data_dir: str) -> None:
    sys.path.insert(0, root)  # this checkout's herd.py, or the baseline's
    import herd

    cfg = herd.Config(host="127.0.0.1", port=0, nodes=urls, data_dir=Path(data_dir),
                      local_ollama=None, mdns=False, poll_interval_s=3600.0,
                      log_level="WARNING", slots={herd.node_id_from_url(u): 32 for u in urls})
    router = herd.Router(cfg)
    _, port = await router.start()
    herd.tune_gc()
    while sum(n.status == "online" for n in router.fleet.nodes.values()) < len(urls):
        await asyncio.sleep(0.05)
    await serve_until_signal(port, router.stop)


async def run_relay(url: str) -> None:
    from bench.proxy_overhead import run_relay as relay

    await relay(url)


# =======================================================================================
# Load and measurement
# =======================================================================================


async def load(port: int, n: int, clients: int, models: list[str]) -> None:
    from bench.proxy_overhead import Client

    conns = [await Client(port).open() for _ in range(clients)]
    todo = iter(range(n))

    async def worker(c: Client) -> None:
        for i in todo:
            body = json.dumps({"model": models[i % len(models)], "prompt": f"why {i % 8}",
                               "stream": False}).encode()
            status, data, _ = await c.post("/api/generate", body)
            if status != 200:
                raise RuntimeError(f"status {status}: {data[:200]!r}")

    await asyncio.gather(*(worker(c) for c in conns))
    for c in conns:
        c.close()


def instructions(role: list[str], n: int, clients: int, models: list[str]) -> int:
    """Ir of one process of ``role`` under callgrind that served ``n`` requests."""
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
            sys.executable, __file__, *role]
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = Proc(argv, ready_line, stderr=err, start_s=300, stop_s=120)
        try:
            asyncio.run(load(int(proc.ready), n, clients, models))
        finally:
            proc.p.send_signal(signal.SIGTERM)
            proc.p.wait(120)
        err.seek(0)
        for line in err:
            if "Collected :" in line:
                return int(line.rsplit(":", 1)[1])
    raise RuntimeError(f"no callgrind total for {role}")


def per_request(role: list[str], n1: int, n2: int, clients: int, models: list[str]) -> float:
    a = instructions(role, n1, clients, models)
    b = instructions(role, n2, clients, models)
    return (b - a) / (n2 - n1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["nodes", "herd", "relay"])
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--root", default=str(ROOT))
    ap.add_argument("--url", action="append", default=[])
    ap.add_argument("--data-dir")
    ap.add_argument("--nodes", type=int, default=1, help="1 (default) or 20")
    ap.add_argument("--clients", type=int, default=1)
    ap.add_argument("--n1", type=int, default=50)
    ap.add_argument("--n2", type=int, default=250)
    ap.add_argument("--baseline", help="another checkout whose herd.py to measure too")
    args = ap.parse_args()
    if args.role:
        use_uvloop()
        if args.role == "nodes":
            asyncio.run(run_nodes(args.count))
        elif args.role == "herd":
            asyncio.run(run_herd(args.root, args.url, args.data_dir))
        else:
            asyncio.run(run_relay(args.url[0]))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: apt-get install valgrind", file=sys.stderr)
        return 2
    use_uvloop()
    t0 = time.time()
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="herd-instr-") as tmp:
        one = Proc([sys.executable, __file__, "--role", "nodes", "--count", "1"], ready_line)
        many = (Proc([sys.executable, __file__, "--role", "nodes", "--count", str(args.nodes)],
                     ready_line, start_s=120) if args.nodes > 1 else None)
        try:
            url = f"http://127.0.0.1:{one.ready.split()[0]}"
            relay = per_request(["--role", "relay", "--url", url], args.n1, args.n2,
                                args.clients, [SMALL_MODEL])
            rows.append(("bare h11 relay, one node", relay))
            trees = [("herd", str(ROOT))]
            if args.baseline:
                trees.append(("baseline herd", str(Path(args.baseline).resolve())))
            for k, (name, root) in enumerate(trees):
                role = ["--role", "herd", "--root", root, "--url", url,
                        "--data-dir", os.path.join(tmp, f"one{k}")]
                rows.append((f"{name}, one node", per_request(
                    role, args.n1, args.n2, args.clients, [SMALL_MODEL])))
                if many is not None:
                    urls = [f"http://127.0.0.1:{p}" for p in many.ready.split()]
                    role = ["--role", "herd", "--root", root, "--data-dir",
                            os.path.join(tmp, f"many{k}")]
                    for u in urls:
                        role += ["--url", u]
                    rows.append((f"{name}, {args.nodes} nodes x 8 models", per_request(
                        role, args.n1, args.n2, args.clients, MODELS)))
        finally:
            one.stop()
            if many is not None:
                many.stop()
    print(f"\ninstructions per request under callgrind ((Ir@{args.n2} - Ir@{args.n1}) / "
          f"{args.n2 - args.n1}), {args.clients} client(s), small non-streaming "
          f"/api/generate ({time.time() - t0:.0f} s)")
    return 0 if report(rows) else 1


def report(rows: list[tuple[str, float]]) -> bool:
    """Print the table; True when herd (the first row after the relay's) is within
    ``TARGET_RATIO`` of the relay (the first row)."""
    relay, herd_one = rows[0][1], rows[1][1]
    ok = herd_one <= TARGET_RATIO * relay
    for name, value in rows:
        print(f"  {name:36} {value / 1e6:7.3f} M  {value / relay:5.2f}x relay")
    print(f"herd, one node: {herd_one / relay:.2f}x the relay; target ≤ {TARGET_RATIO}x: "
          f"{'PASS' if ok else 'MISS'} (run to run about +-3 %)")
    return ok


if __name__ == "__main__":
    sys.exit(main())

