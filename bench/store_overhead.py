"""What the trace store costs the router under load: latency with the store on vs off.

    python bench/store_overhead.py [--rate 300] [--requests 3000] [--rounds 3]

A fake node (bench/proxy_overhead.py's node role) and herd run in their own processes; this
process is the load generator. Herd runs alternately with its real store and with a null
store (``record_trace``/``record_event`` do nothing), ``--rounds`` times each, and each run
has two parts:

* **paced** (the issue 6 target: p99 with the store at most 5 % worse than without):
  requests start on a fixed schedule (``--rate`` per second, open loop, a connection per
  request in flight), and each latency is measured from its scheduled start, so a stall
  in herd shows up in every request that queued behind it. This is the router as a fleet
  sees it: busy, not saturated. The verdict compares the median over blocks of each
  block's p99 (robust to a hiccup of the shared machine landing in one block); the p99
  pooled over the whole run is printed too.
* **saturated** (information): ``--concurrency`` clients back to back, as fast as herd
  answers. Here herd's CPU is the bottleneck, so anything the store spends shows up as
  lost throughput; the table gives herd's CPU per request with the store on and off.

The last line gives the traces the store committed per second of load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import proxy_overhead as po  # noqa: E402


def null_store_class() -> type:
    import store

    class NullStore(store.Store):
        """The real store, except that traces and events are dropped on the floor."""

        def record_trace(self, rec: store.TraceRecord) -> None:
            return None

        def record_event(self, kind: str, node_id: str, detail: Mapping[str, object],
                         *, timestamp: float | None = None) -> None:
            return None

    return NullStore


def NullStore(data_dir: Path) -> Any:
    return null_store_class()(data_dir)


async def run_herd(node: str, data_dir: str, store_on: bool) -> None:
    import logging

    import herd

    logging.basicConfig(level=logging.WARNING)
    cfg = herd.Config(host="127.0.0.1", port=0, nodes=[node], data_dir=Path(data_dir),
                      local_ollama=None, mdns=False, poll_interval_s=2.0, log_level="WARNING")
    cfg.slots = {herd.node_id_from_url(node): 64}
    router = herd.Router(cfg)
    if not store_on:
        router.store = NullStore(Path(data_dir))
    _, port = await router.start()
    started = time.monotonic()

    async def stop() -> None:
        await router.store.flush()
        stats = router.store.stats().to_json()
        stats["uptime_s"] = time.monotonic() - started
        print("STATS " + json.dumps(stats), flush=True)
        await router.stop()

    await po.serve_until_signal(port, stop)


class Herd:
    def __init__(self, node: str, data_dir: str, store_on: bool) -> None:
        self.p = subprocess.Popen(
            [sys.executable, __file__, "--role", "herd", "--node", node, "--data-dir", data_dir,
             "--store", "on" if store_on else "off"],
            stdout=subprocess.PIPE, text=True, cwd=ROOT)
        assert self.p.stdout is not None
        line = self.p.stdout.readline()
        if not line.startswith("READY"):
            self.p.kill()
            raise RuntimeError("herd did not start")
        self.port = int(line.split()[1])

    def stop(self) -> dict[str, Any]:
        self.p.send_signal(signal.SIGTERM)
        out, _ = self.p.communicate(timeout=30)
        for line in out.splitlines():
            if line.startswith("STATS "):
                stats: dict[str, Any] = json.loads(line[6:])
                return stats
        return {}


async def load(port: int, concurrency: int, total: int) -> tuple[list[float], float]:
    lat, elapsed, errors = await po.closed_loop(port, concurrency, total)
    if errors:
        raise RuntimeError(errors[0])
    return lat, elapsed


async def paced(port: int, rate: float, total: int) -> list[float]:
    """Open-loop load: request i starts at t0 + i / rate whatever happened before it;
    latency counts from that scheduled start (so queueing behind a stall is included)."""
    idle: list[po.Client] = []
    lat: list[float] = []
    clock = time.perf_counter  # (uvloop's loop.time() ticks in whole milliseconds)

    async def one(i: int, due: float) -> None:
        c = idle.pop() if idle else await po.Client(port).open()
        status, body, _ = await c.post("/api/generate", po.small_body(i))
        lat.append(clock() - due)
        if status != 200:
            raise RuntimeError(f"status {status}: {body[:200]!r}")
        idle.append(c)

    tasks: list[asyncio.Task[None]] = []
    t0 = clock() + 0.05
    for i in range(total):
        due = t0 + i / rate
        delay = due - clock()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(i, due)))
    await asyncio.gather(*tasks)
    for c in idle:
        c.close()
    return lat


async def bench(args: argparse.Namespace) -> int:
    node = po.Proc("--role", "node")
    runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
    block = max(100, args.requests // args.blocks)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for r in range(args.rounds):
                # Both routers run side by side and take the load in alternating blocks,
                # so drift on these shared cores hits both alike.
                herds = {mode: Herd(node.url, f"{tmp}/{mode}{r}", mode == "on")
                         for mode in ("on", "off")}
                try:
                    for h in herds.values():
                        await po.wait_routable(h.port, [po.SMALL_MODEL])
                        await load(h.port, args.concurrency, 200)  # warm-up
                    got: dict[str, dict[str, Any]] = {
                        m: {"paced": [], "block_p99": [], "sat": [], "elapsed": 0.0, "cpu": 0.0}
                        for m in herds
                    }
                    for b in range(args.requests // block):
                        order = ("on", "off") if b % 2 == 0 else ("off", "on")
                        for mode in order:
                            lat = await paced(herds[mode].port, args.rate, block)
                            got[mode]["paced"] += lat
                            got[mode]["block_p99"].append(po.pct(lat, 0.99))
                    for b in range(args.requests // block):
                        order = ("on", "off") if b % 2 == 0 else ("off", "on")
                        for mode in order:
                            h = herds[mode]
                            c0 = po.cpu_s(h.p.pid)
                            lat, elapsed = await load(h.port, args.concurrency, block)
                            got[mode]["cpu"] += po.cpu_s(h.p.pid) - c0
                            got[mode]["sat"] += lat
                            got[mode]["elapsed"] += elapsed
                finally:
                    for mode, h in herds.items():
                        got[mode]["stats"] = h.stop()
                for mode in herds:
                    runs[mode].append(got[mode])
                print(f"  round {r + 1}: done", file=sys.stderr, flush=True)
    finally:
        node.stop()
    n_run = (args.requests // block) * block

    def figures(mode: str) -> dict[str, float]:
        rs = runs[mode]
        paced_all = [x for run in rs for x in run["paced"]]
        sat_all = [x for run in rs for x in run["sat"]]
        return {
            "p50": po.pct(paced_all, 0.5) * 1000,
            "p99": po.pct(paced_all, 0.99) * 1000,
            "block_p99": statistics.median(x for run in rs for x in run["block_p99"]) * 1000,
            "sat_p99": po.pct(sat_all, 0.99) * 1000,
            "rps": statistics.mean(n_run / run["elapsed"] for run in rs),
            "cpu_ms": statistics.mean(run["cpu"] for run in rs) / n_run * 1000,
        }

    on, off = figures("on"), figures("off")
    print(f"\ntrace store on vs off: {args.rounds} rounds, each with both routers side by side "
          f"taking alternating blocks of {block} requests; fake node with 64 slots; 2 shared "
          f"cores")
    print(f"paced: {n_run} requests per round and router at {args.rate:g}/s (open loop); "
          f"saturated: {n_run} per round and router at concurrency {args.concurrency}")
    head = (f"{'store':<6} {'paced p50':>10} {'block p99':>10} {'paced p99':>10} {'sat. p99':>9}"
            f" {'sat. req/s':>11} {'herd CPU/req':>13}")
    print(head)
    for name, f in (("off", off), ("on", on)):
        print(f"{name:<6} {f['p50']:>8.2f}ms {f['block_p99']:>8.2f}ms {f['p99']:>8.2f}ms "
              f"{f['sat_p99']:>7.2f}ms {f['rps']:>11.0f} {f['cpu_ms']:>11.3f}ms")
    ratio = on["block_p99"] / off["block_p99"]
    verdict = "PASS" if ratio <= args.target else "MISS"
    print(f"\npaced p99 with store / without: {ratio:.3f}x (target <= {args.target:.2f}x: "
          f"{verdict}); "
          f"pooled over the whole run: {on['p99'] / off['p99']:.3f}x")
    print("(block p99: the p99 of each block, median over blocks; both routers take the same "
          "alternating blocks, so a machine hiccup moves one block, not the verdict; the "
          "pooled p99 is dominated by such hiccups on a shared VM)")
    print(f"saturated: p99 {on['sat_p99'] / off['sat_p99']:.3f}x, throughput "
          f"{on['rps'] / off['rps']:.3f}x, store CPU per request "
          f"{(on['cpu_ms'] - off['cpu_ms']) * 1000:.0f} us")
    written = sum(run["stats"].get("records_written", 0) for run in runs["on"])
    writer_cpu = sum(run["stats"].get("writer_cpu_s", 0.0) for run in runs["on"])
    print(f"store writer thread: {writer_cpu / max(1, written) * 1e6:.0f} us CPU per trace "
          f"(thread_time over the whole run)")
    secs = sum(len(run["paced"]) / args.rate + run["elapsed"] for run in runs["on"])
    print(f"traces committed while serving: {written} in {secs:.1f} s of load = "
          f"{written / secs:.0f} traces/s (every request: one row; warm-up included)")
    return exit_code(ratio, args.target)


TARGET_RATIO = 1.05  # paced p99 with the store at most 5 % worse than without


def exit_code(ratio: float, target: float) -> int:
    """0 when the store's cost is within the target, else 1."""
    return 0 if ratio <= target else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["herd"])
    ap.add_argument("--node")
    ap.add_argument("--data-dir")
    ap.add_argument("--store", choices=["on", "off"], default="on")
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=300.0, help="paced requests per second")
    ap.add_argument("--blocks", type=int, default=30, help="alternating blocks per round")
    ap.add_argument("--target", type=float, default=TARGET_RATIO,
                    help="paced p99 store on / off must be at most this")
    args = ap.parse_args()
    po.use_uvloop()
    if args.role == "herd":
        asyncio.run(run_herd(args.node, args.data_dir, args.store == "on"))
        return 0
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
