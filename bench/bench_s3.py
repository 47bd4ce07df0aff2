"""The S3 store of the benchmarks (a private SeaweedFS), its floor, and S3-only figures.

``python -m bench --backend s3`` runs every workload on it (W1, W2, W3e, R,
...; the engine workloads count the S3 requests they send, by operation).
``python -m bench.bench_s3 [--workload floor,contention,idle,W1,W2,W3e]
[--endpoint URL --bucket B]`` runs the S3-only figures below, and hands any
other workload to ``python -m bench`` with this backend preselected. Without
``--endpoint`` a private ``weed mini`` is started on 127.0.0.1 and stopped at
the end. The floor is one conditional PUT round trip (If-None-Match: *, a
~60-byte entry) measured in the same run.

* floor: n sequential conditional PUTs to fresh keys (and unconditional ones).
* contention: N concurrent conditional PUTs to one key, and to N keys.
* idle: requests an idle worker sends per minute.

Provides the s3 entry of bench.bench_backends.TARGETS (``s3_store_url``,
``s3_append_floor``, ``s3_read_floor``).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import hashlib
import json
import signal
import statistics
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from substantial.backends.s3 import S3Backend
from substantial.backends.s3._objects import _content_md5
from substantial.records import encode_entry
from tests.s3_server import S3Server

ROOT = Path(__file__).resolve().parent.parent

_server: S3Server | None = None
_external: dict[str, str] = {}


def server_url(prefix: str, **query: Any) -> str:
    """Return an s3:// URL of ``prefix`` on the bench server, starting it on first use."""
    global _server
    if _external:
        from urllib.parse import urlencode

        params = {"endpoint": _external["endpoint"], **query}
        return f"s3://{_external['bucket']}/{prefix}?{urlencode(params)}"
    if _server is None:
        _server = S3Server()
        _server.start()
        atexit.register(_server.stop)
        if threading.current_thread() is threading.main_thread():
            # Also on SIGTERM (timeout, kill): the server runs in a session of its own.
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return _server.url(prefix, **query)


def s3_store_url(work: Path, durability: str = "process") -> str:
    """Return the URL of the store of ``work``: one prefix per work dir, from any process."""
    digest = hashlib.sha256(str(work.resolve()).encode()).hexdigest()[:16]
    return server_url(f"bench-{digest}")


def _in_thread(coro_fn: Any) -> Any:
    # Floors are called from inside a running loop: give them a loop of their own.
    server_url("")  # start the server (if needed) from this thread, not the helper
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(asyncio.run(coro_fn())))
    thread.start()
    thread.join()
    return out[0]


async def _raw_puts(n: int, *, conditional: bool = True) -> float:
    backend = S3Backend.from_url(server_url(f"floor-{uuid.uuid4().hex[:8]}"))
    client = await backend._objects.open()
    body = encode_entry([{"k": "step", "name": "charge", "value": {"n": 0, "ok": True}}])
    md5 = _content_md5(body)
    prefix = backend.key_prefix
    try:
        await client.list_objects_v2(
            Bucket=backend._objects.bucket, Prefix=prefix, MaxKeys=1
        )  # connect
        t0 = time.perf_counter()
        for i in range(n):
            if conditional:
                await client.put_object(
                    Bucket=backend._objects.bucket,
                    Key=f"{prefix}f/{i:010d}",
                    Body=body,
                    ContentMD5=md5,
                    IfNoneMatch="*",
                )
            else:
                await client.put_object(
                    Bucket=backend._objects.bucket,
                    Key=f"{prefix}f/{i:010d}",
                    Body=body,
                    ContentMD5=md5,
                )
        return time.perf_counter() - t0
    finally:
        await backend.close()


async def _raw_gets(n: int) -> float:
    backend = S3Backend.from_url(server_url(f"floor-{uuid.uuid4().hex[:8]}"))
    client = await backend._objects.open()
    key = f"{backend.key_prefix}f/0"
    try:
        await client.put_object(Bucket=backend._objects.bucket, Key=key, Body=b"[1]")
        t0 = time.perf_counter()
        for _ in range(n):
            resp = await client.get_object(Bucket=backend._objects.bucket, Key=key)
            await resp["Body"].read()
        return time.perf_counter() - t0
    finally:
        await backend.close()


def s3_append_floor(work: Path, n: int, durability: str) -> float:
    """Seconds for n sequential conditional PUTs of a ~60-byte entry (one round trip each)."""
    # Capped: a round trip is milliseconds. Scaled back to n so callers can divide by n.
    done = min(n, 300)
    return float(_in_thread(lambda: _raw_puts(done))) * n / done


def s3_read_floor(work: Path, n: int, durability: str) -> float:
    """Seconds for n sequential GETs of one small object."""
    done = min(n, 300)
    return float(_in_thread(lambda: _raw_gets(done))) * n / done


# -- measurements --------------------------------------------------------------------


def emit(**fields: Any) -> None:
    print(json.dumps(fields), flush=True)


async def floor_ms(n: int = 200) -> float:
    await _raw_puts(20)  # warm the server's volume
    return min([await _raw_puts(n) for _ in range(3)]) / n * 1000


async def _contend(n: int, same_key: bool) -> tuple[float, list[float], int]:
    """Send n conditional PUTs at once; return (wall seconds, each one's latency, winners)."""
    backend = S3Backend.from_url(server_url(f"contend-{uuid.uuid4().hex[:8]}"))
    client = await backend._objects.open()
    # Open n connections first, so the n PUTs leave together instead of one per handshake.
    await asyncio.gather(
        *(
            client.list_objects_v2(Bucket=backend._objects.bucket, Prefix="x", MaxKeys=1)
            for _ in range(n)
        )
    )
    times: list[float] = []
    winners = 0

    async def put(i: int, t0: float) -> None:
        nonlocal winners
        key = f"{backend.key_prefix}k" + ("" if same_key else f"/{i}")
        body = f"v{i}".encode()
        try:
            await client.put_object(
                Bucket=backend._objects.bucket,
                Key=key,
                Body=body,
                ContentMD5=_content_md5(body),
                IfNoneMatch="*",
            )
            winners += 1
        except Exception as exc:
            if "PreconditionFailed" not in str(exc) and "409" not in str(exc):
                raise
        times.append(time.perf_counter() - t0)

    try:
        t0 = time.perf_counter()
        await asyncio.gather(*(put(i, t0) for i in range(n)))
        return time.perf_counter() - t0, sorted(times), winners
    finally:
        await backend.close()


async def contention(floor: float, trials: int = 3) -> None:
    for n in (2, 8, 32):
        for same_key in (True, False):
            runs = [await _contend(n, same_key) for _ in range(trials)]
            medians = sorted(statistics.median(t) for _, t, _ in runs)
            worst = max(t[-1] for _, t, _ in runs)
            per = statistics.median(medians) * 1000
            emit(
                workload="contention_same_key" if same_key else "contention_distinct_keys",
                backend="s3",
                n=n,
                seconds=round(statistics.median(s for s, _, _ in runs), 4),
                per_op_ms=round(per, 2),
                max_ms=round(worst * 1000, 2),
                floor_ms=round(floor, 3),
                ratio=round(per / floor, 2),
                winners=[w for _, _, w in runs],
                trials=trials,
                ok=all(w == (1 if same_key else n) for _, _, w in runs),
                note="per_op_ms: median over trials of the median latency of N concurrent "
                "conditional PUTs; max_ms: the slowest one",
            )


async def _conductor(prefix: str, **query: Any) -> Any:
    from bench.bench_engine import steps
    from substantial import Conductor

    conductor = Conductor(S3Backend.from_url(server_url(prefix, **query)))
    conductor.register(steps)
    return conductor


async def idle(floor: float, seconds: float = 20.0) -> None:
    conductor = await _conductor(f"idle-{uuid.uuid4().hex[:8]}")
    agent = conductor.run()
    await asyncio.sleep(5.0)  # let the poll interval back off to max_poll
    before = Counter(conductor.backend.requests)
    await asyncio.sleep(seconds)
    spent = Counter(conductor.backend.requests) - before
    agent.cancel()
    await agent
    await conductor.close()
    per_minute = {k: round(v * 60 / seconds, 1) for k, v in spent.items()}
    emit(
        workload="idle",
        backend="s3",
        n=int(seconds),
        seconds=seconds,
        per_op_ms=None,
        floor_ms=round(floor, 4),
        ratio=None,
        ok=True,
        requests_per_minute=per_minute,
        max_poll=conductor.backend.max_poll,
    )


async def parked(floor: float, seconds: float = 20.0, ttl: float = 6.0, on: str = "timer") -> None:
    """Requests while one run waits ``seconds`` in a worker's memory (``lease_ttl`` ttl).

    ``on="timer"``: it sleeps; ``on="event"``: it waits for an event, sent at the end.
    """
    from bench.bench_engine import naps, pings

    conductor = await _conductor(f"parked-{uuid.uuid4().hex[:8]}")
    conductor.register(naps)
    conductor.register(pings)
    agent = conductor.run(lease_ttl=ttl, idle_timeout=3 * seconds)
    if on == "timer":
        run = await conductor.start(naps, {"n": 1, "seconds": seconds})
    else:
        run = await conductor.start(pings, {"n": 1})
    await asyncio.sleep(1.0)  # taken, the wait recorded
    before = Counter(conductor.backend.requests)
    await asyncio.sleep(seconds - 1.5)  # up to just before it wakes
    spent = Counter(conductor.backend.requests) - before
    if on == "event":
        await run.send("ping", time.time())
    ok = await run.result(timeout=seconds + 60) == 1
    agent.cancel()
    await agent
    await conductor.close()
    emit(
        workload="parked" if on == "timer" else "parked-event",
        backend="s3",
        n=1,
        seconds=seconds - 1.5,
        per_op_ms=None,
        floor_ms=round(floor, 4),
        ratio=None,
        ok=ok,
        requests_while_parked=dict(spent),
        lease_ttl=ttl,
        note=f"requests while one run waits for {'a timer' if on == 'timer' else 'an event'} "
        "in a worker's memory, its wait "
        "recorded (a renewal every lease_ttl/3 would be one PUT each)",
    )


S3_ONLY = ("floor", "contention", "idle", "parked", "parked-event")


async def main_async(args: argparse.Namespace, workloads: list[str]) -> None:
    if args.endpoint:
        _external.update(endpoint=args.endpoint, bucket=args.bucket)
    floor = await floor_ms()
    plain = min([await _raw_puts(200, conditional=False) for _ in range(3)]) / 200 * 1000
    emit(
        workload="floor",
        backend="s3",
        n=200,
        seconds=round(floor * 200 / 1000, 4),
        per_op_ms=round(floor, 4),
        floor_ms=round(floor, 4),
        ratio=1.0,
        ok=True,
        plain_put_ms=round(plain, 4),
        note="one conditional PUT (If-None-Match: *) round trip; plain_put_ms: unconditional",
    )
    if "contention" in workloads:
        await contention(floor)
    if "idle" in workloads:
        await idle(floor)
    if "parked" in workloads:
        await parked(floor)
    if "parked-event" in workloads:
        await parked(floor, on="event")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="floor,contention,W1,W2,W3e,idle")
    parser.add_argument(
        "--endpoint", default=None, help="an existing S3 server (default: start one)"
    )
    parser.add_argument("--bucket", default="substantial")
    args, rest = parser.parse_known_args()
    chosen = args.workload.split(",")
    # This module runs as __main__: the store's settings go to the module TARGETS imports.
    from bench import bench_s3

    if args.endpoint:
        bench_s3._external.update(endpoint=args.endpoint, bucket=args.bucket)
    if any(w in S3_ONLY for w in chosen):
        asyncio.run(bench_s3.main_async(args, chosen))
    others = [w for w in chosen if w not in S3_ONLY]
    if others:
        from bench.__main__ import main as bench_main

        bench_main(["--backend", "s3", "--workload", ",".join(others), *rest])


if __name__ == "__main__":
    main()
