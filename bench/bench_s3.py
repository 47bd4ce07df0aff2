"""The S3 backend on a real S3 server (a private SeaweedFS), each figure beside its floor.

Run ``python -m bench.bench_s3 [--workload floor,contention,W1,W2,W3e,idle]
[--endpoint URL --bucket B]``: without ``--endpoint`` a private ``weed mini``
is started on 127.0.0.1 and stopped at the end. Prints one JSON line per
measurement: ``{"workload", "backend", "n", "seconds", "per_op_ms",
"floor_ms", "ratio", "ok", ...}``, where the floor is one conditional PUT
round trip (If-None-Match: *, a ~60-byte entry) measured in the same run, and
``requests`` counts the S3 requests the workload sent, by operation.

* floor: n sequential conditional PUTs to fresh keys.
* contention: N concurrent conditional PUTs to one key, and to N keys.
* W1: one workflow, 1,000 sequential ``save`` steps (per_op = one step).
* W2: 200 workflows x 10 steps, one worker (``wf_per_s``).
* W3e: event latency, ``send`` from another process -> seen in the workflow, p50
  (the worker polls: min_poll/max_poll bound it).
* idle: requests an idle worker sends per minute.

Also provides the s3 entry of bench.bench_backends.TARGETS (``open_s3``,
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


def open_s3(work: Path, durability: str) -> S3Backend:
    """Open the store of ``work`` (the bench_backends ``open`` hook): one prefix per work dir."""
    digest = hashlib.sha256(str(work.resolve()).encode()).hexdigest()[:16]
    return S3Backend.from_url(server_url(f"bench-{digest}"))


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
    client = await backend._open()
    body = encode_entry([{"k": "step", "name": "charge", "value": {"n": 0, "ok": True}}])
    md5 = _content_md5(body)
    prefix = backend.key_prefix
    try:
        await client.list_objects_v2(Bucket=backend.bucket, Prefix=prefix, MaxKeys=1)  # connect
        t0 = time.perf_counter()
        for i in range(n):
            if conditional:
                await client.put_object(
                    Bucket=backend.bucket,
                    Key=f"{prefix}f/{i:010d}",
                    Body=body,
                    ContentMD5=md5,
                    IfNoneMatch="*",
                )
            else:
                await client.put_object(
                    Bucket=backend.bucket, Key=f"{prefix}f/{i:010d}", Body=body, ContentMD5=md5
                )
        return time.perf_counter() - t0
    finally:
        await backend.close()


async def _raw_gets(n: int) -> float:
    backend = S3Backend.from_url(server_url(f"floor-{uuid.uuid4().hex[:8]}"))
    client = await backend._open()
    key = f"{backend.key_prefix}f/0"
    try:
        await client.put_object(Bucket=backend.bucket, Key=key, Body=b"[1]")
        t0 = time.perf_counter()
        for _ in range(n):
            resp = await client.get_object(Bucket=backend.bucket, Key=key)
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
    client = await backend._open()
    # Open n connections first, so the n PUTs leave together instead of one per handshake.
    await asyncio.gather(
        *(client.list_objects_v2(Bucket=backend.bucket, Prefix="x", MaxKeys=1) for _ in range(n))
    )
    times: list[float] = []
    winners = 0

    async def put(i: int, t0: float) -> None:
        nonlocal winners
        key = f"{backend.key_prefix}k" + ("" if same_key else f"/{i}")
        body = f"v{i}".encode()
        try:
            await client.put_object(
                Bucket=backend.bucket,
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


def _engine() -> Any:
    from bench import bench_engine

    return bench_engine


async def _conductor(prefix: str, **query: Any) -> Any:
    from substantial import Conductor

    eng = _engine()
    conductor = Conductor(S3Backend.from_url(server_url(prefix, **query)))
    for wf in (eng.steps, eng.pings):
        conductor.register(wf)
    return conductor


def _requests(conductor: Any) -> dict[str, int]:
    return dict(conductor.backend.requests)


async def w1(floor: float) -> None:
    eng = _engine()
    conductor = await _conductor(f"w1-{uuid.uuid4().hex[:8]}")
    agent = conductor.run()
    n = 1000
    await (await conductor.start(eng.steps, {"n": 5})).result(timeout=60)  # warm up
    before = Counter(conductor.backend.requests)
    t0 = time.perf_counter()
    ok = await (await conductor.start(eng.steps, {"n": n})).result(timeout=600) == n
    seconds = time.perf_counter() - t0
    spent = Counter(conductor.backend.requests) - before
    agent.cancel()
    await agent
    await conductor.close()
    per = seconds / n * 1000
    emit(
        workload="W1",
        backend="s3",
        n=n,
        seconds=round(seconds, 4),
        per_op_ms=round(per, 4),
        floor_ms=round(floor, 4),
        ratio=round(per / floor, 2),
        ok=ok,
        requests=dict(spent),
        requests_per_step=round(sum(spent.values()) / n, 3),
    )


async def w2(floor: float) -> None:
    eng = _engine()
    conductor = await _conductor(f"w2-{uuid.uuid4().hex[:8]}")
    agent = conductor.run()
    n = 200
    before = Counter(conductor.backend.requests)
    t0 = time.perf_counter()
    runs = [await conductor.start(eng.steps, {"n": 10}) for _ in range(n)]
    results = await asyncio.gather(*(r.result(timeout=600) for r in runs))
    seconds = time.perf_counter() - t0
    spent = Counter(conductor.backend.requests) - before
    agent.cancel()
    await agent
    await conductor.close()
    per = seconds / n * 1000
    emit(
        workload="W2",
        backend="s3",
        n=n,
        seconds=round(seconds, 4),
        per_op_ms=round(per, 4),
        wf_per_s=round(n / seconds, 1),
        floor_ms=round(floor, 4),
        ratio=round(per / (floor * 16), 2),
        ok=all(r == 10 for r in results),
        requests=dict(spent),
        requests_per_workflow=round(sum(spent.values()) / n, 2),
        note="ratio against 16 floor writes; client and worker share one process and backend",
    )


async def w3e(floor: float, min_poll: float, max_poll: float) -> None:
    eng = _engine()
    eng.latencies.clear()
    prefix = f"w3e-{uuid.uuid4().hex[:8]}"
    query = {"min_poll": min_poll, "max_poll": max_poll}
    conductor = await _conductor(prefix, **query)
    agent = conductor.run()
    n = 30
    run = await conductor.start(eng.pings, {"n": n})
    await asyncio.sleep(0.5)
    sender = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        SENDER,
        server_url(prefix, **query),
        run.run_id,
        str(n),
        cwd=ROOT,
    )
    ok = await run.result(timeout=300) == n
    await sender.wait()
    agent.cancel()
    await agent
    await conductor.close()
    lat = sorted(eng.latencies)
    p50 = statistics.median(lat) * 1000
    emit(
        workload="W3e",
        backend="s3",
        n=n,
        seconds=round(sum(lat), 4),
        per_op_ms=round(p50, 2),
        p90_ms=round(lat[int(len(lat) * 0.9)] * 1000, 2),
        floor_ms=round(floor, 4),
        ratio=round(p50 / floor, 2),
        min_poll=min_poll,
        max_poll=max_poll,
        ok=ok,
        note="events sent 0.3 s apart from another process; the worker finds them by polling",
    )


SENDER = """
import asyncio, sys, time
from substantial import Conductor
async def main():
    c = Conductor(sys.argv[1])
    run = c.get(sys.argv[2])
    for _ in range(int(sys.argv[3])):
        await asyncio.sleep(0.3)
        await run.send("ping", time.time())
    await c.close()
asyncio.run(main())
"""


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


async def main_async(args: argparse.Namespace) -> None:
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
    for workload in args.workload.split(","):
        if workload == "floor":
            continue
        if workload == "contention":
            await contention(floor)
        elif workload == "W1":
            await w1(floor)
        elif workload == "W2":
            await w2(floor)
        elif workload == "W3e":
            await w3e(floor, 0.05, 2.0)
            await w3e(floor, 0.02, 0.2)
        elif workload == "idle":
            await idle(floor)
        else:
            raise SystemExit(f"unknown workload {workload!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", default="floor,contention,W1,W2,W3e,idle")
    parser.add_argument(
        "--endpoint", default=None, help="an existing S3 server (default: start one)"
    )
    parser.add_argument("--bucket", default="substantial")
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
