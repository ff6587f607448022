"""Chaos benchmark: a few hundred requests while nodes are killed, stopped, broken and stalled.

Prints requests sent, succeeded, failed with a clean error, lost (must be 0), and the p99
latency added compared with the same run without faults (same fleet, same load).

    python bench/chaos.py [--requests 300] [--concurrency 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.chaos import ChaosResult, run_scenario  # noqa: E402


def row(name: str, r: ChaosResult) -> str:
    ok = sum(o.ok for o in r.outcomes)
    clean = sum((not o.ok) and o.clean_error for o in r.outcomes)
    return (f"{name:<10} {len(r.outcomes):>6} {ok:>9} {clean:>11} {len(r.lost):>5} "
            f"{r.p50() * 1000:>8.0f} {r.p99() * 1000:>8.0f} "
            f"{(r.rss_after - r.rss_before) / 1e6:>+8.1f} {r.tasks_after - r.tasks_before:>+6}")


def exit_code(calm: ChaosResult, chaos: ChaosResult) -> int:
    """The target: no request lost (every one answered, or ended with a clean error in its
    dialect), with and without faults. 0 when met, else 1."""
    return 0 if not calm.lost and not chaos.lost else 1


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--concurrency", type=int, default=16)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        calm = await run_scenario(Path(d) / "calm", requests=args.requests,
                                  concurrency=args.concurrency, faults=False)
        chaos = await run_scenario(Path(d) / "chaos", requests=args.requests,
                                   concurrency=args.concurrency, faults=True)
    print(f"{'run':<10} {'sent':>6} {'succeeded':>9} {'clean error':>11} {'lost':>5} "
          f"{'p50 ms':>8} {'p99 ms':>8} {'RSS MB':>8} {'tasks':>6}")
    print(row("no faults", calm))
    print(row("chaos", chaos))
    added = chaos.p99() - calm.p99()
    print(f"\nadded p99 latency under chaos: {added * 1000:+.0f} ms "
          f"({chaos.p99() / calm.p99():.2f}x); lost requests: {len(chaos.lost)} (target 0: "
          f"{'PASS' if exit_code(calm, chaos) == 0 else 'MISS'}; without faults "
          f"{len(calm.lost)})")
    print("faults a third of the way in: 1 node SIGKILLed, 1 SIGSTOPped, 1 answering 500, "
          "1 stalling before its first byte; 2 healthy; first-byte timeout 1.5 s, "
          "stall (reaper) timeout 2 s")
    return exit_code(calm, chaos)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
