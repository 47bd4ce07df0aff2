"""Run every benchmark workload on every store: ``python -m bench``.

    python -m bench [--workload W1,W2,...] [--backend sqlite,fs,...]
                    [--durability process|fsync] [--n 500 | --n W5=1000000,W1=200]
                    [--repeat 3] [--out results.jsonl] [--report]

Prints one JSON line per (workload, store): ``{"workload", "backend",
"durability", "n", "repeat", "seconds", "per_op_ms", "floor_ms", "ratio",
"ok", ...}``. ``floor_ms`` is one record written the cheapest way the store
allows, measured in each round (bench.bench_backends); ``ratio`` compares
the workload with it. Every workload checks its result; a wrong result
gives ``"ok": false`` and an ``"error"``, never a time. Workloads that need
other processes to open the store (W3e, W4, W5, W6) are ``"skipped"`` on the
memory store. Redis, S3 and Postgres servers are private ones started on
first use (bench_redis, bench_s3, bench_backends) and stopped at exit.
``--durability`` selects fs and SQLite's mode (and their floors'); the
servers keep their own settings (Redis: AOF, fsync every second).

``--report`` regenerates docs/BENCHMARKS.md's "Engine workloads" table and
docs/bench.svg from the lines of this run, or with ``--out`` from every line
of that file, the latest of each (workload, store, durability) winning
(``python -m bench.report results.jsonl`` does it from saved lines).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench._harness import Spec, measure
from bench.bench_backends import TARGETS, primitive
from bench.bench_engine import r, w1, w2, w3e, w3s, w4, w6
from bench.bench_fanout import w7
from bench.bench_list import ls
from bench.bench_queues import w8
from bench.bench_replay import mg, rc
from bench.bench_scale import w5

WORKLOADS: dict[str, Spec] = {
    "W1": Spec(w1, 1000, "one workflow of n sequential steps; per step"),
    "W2": Spec(w2, 200, "n workflows x 10 steps, one worker; per workflow"),
    "W3s": Spec(w3s, 50, "n durable 10 ms sleeps; overhead per sleep"),
    "W3e": Spec(w3e, 50, "n events from another process; p50 latency", shared=True),
    "W4": Spec(w4, 100, "SIGKILL mid-step n/2 of n; new worker to first resumed step", shared=True),
    # BENCH.md's W5 is a million (--n W5=1000000); a tenth by default keeps a full run within
    # minutes on fs, where filling the store goes through the backend.
    "W5": Spec(w5, 100_000, "one more run beside n waiting runs", shared=True, once=True),
    "LS": Spec(ls, 100_000, "the newest 50 runs beside n runs (list_recent)", once=True),
    "W6": Spec(w6, 500, "4 worker processes against 1, n workflows x 10 steps", shared=True),
    "W7": Spec(w7, 100, "one parent gathering n children x 10 steps; per child step"),
    "W8": Spec(w8, 2000, "n runs of 10 steps through a queue, concurrency 100; per run"),
    "R": Spec(r, 10_000, "replay an n-step log to where it waits"),
    "RC": Spec(rc, 2000, "check n stored runs by replay (check_store); per run"),
    "MG": Spec(mg, 2000, "migrate n stored runs to a fresh store; per run"),
    "append": Spec(primitive("append"), 2000, "backend append, one after another; per record"),
    "append_concurrent": Spec(
        primitive("append_concurrent"), 2000, "backend append, 50 runs at once; per record"
    ),
    "read": Spec(primitive("read"), 2000, "backend read_log of n entries; per entry"),
}


def sizes(text: str | None, chosen: list[str]) -> dict[str, int]:
    """Parse ``--n``: one size for every workload, or ``W5=1000000,W1=200``."""
    out = {w: WORKLOADS[w].n for w in chosen}
    if not text:
        return out
    if "=" not in text:
        return dict.fromkeys(chosen, int(text))
    for part in text.split(","):
        name, _, value = part.partition("=")
        if name not in WORKLOADS:
            raise SystemExit(f"--n names {name!r}: choose from {', '.join(WORKLOADS)}")
        out[name] = int(value)
    return out


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default=",".join(WORKLOADS), help="comma-separated")
    parser.add_argument("--backend", default=None, help="comma-separated (default: all)")
    parser.add_argument("--durability", choices=("process", "fsync"), default="process")
    parser.add_argument("--n", default=None, help="size: N for all, or W1=N,W5=N,...")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; medians are printed")
    parser.add_argument("--dir", default=None, help="where stores are made (default: temp)")
    parser.add_argument("--out", default=None, help="also append the lines to this file")
    parser.add_argument("--report", action="store_true", help="regenerate the docs' table/plot")
    args = parser.parse_args(argv)
    args.workloads = args.workload.split(",")
    unknown = [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload {unknown[0]!r}: choose from {', '.join(WORKLOADS)}")
    args.backends = (args.backend or ",".join(TARGETS)).split(",")
    unknown = [b for b in args.backends if b not in TARGETS]
    if unknown:
        parser.error(f"unknown backend {unknown[0]!r}: choose from {', '.join(TARGETS)}")
    args.sizes = sizes(args.n, args.workloads)
    return args


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Run the chosen workloads on the chosen stores; print and return the lines."""
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-"))
    out = open(args.out, "a") if args.out else None  # noqa: SIM115 - kept open for the run
    lines = []
    try:
        for name in args.backends:
            for workload in args.workloads:
                spec = WORKLOADS[workload]
                n = args.sizes[workload]
                for line in await measure(
                    workload, spec, name, n, args.durability, args.repeat, base
                ):
                    text = json.dumps(line)
                    print(text, flush=True)
                    if out is not None:
                        print(text, file=out, flush=True)
                    lines.append(line)
    finally:
        if out is not None:
            out.close()
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
    return lines


def main(argv: list[str] | None = None) -> None:
    """Parse the options, run, and regenerate the report if asked."""
    args = parse(argv)
    lines = asyncio.run(run(args))
    if args.report:
        from bench.report import load, regenerate

        # With --out, the file's earlier lines too (other stores, other sittings); the latest wins.
        regenerate(load([args.out]) if args.out else lines)
    if any(line.get("ok") is False for line in lines):
        sys.exit(1)


if __name__ == "__main__":
    main()
