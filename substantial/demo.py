"""The README's workflow, narrated: what ``substantial demo`` runs."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from datetime import timedelta

import click

from substantial.conductor import Conductor
from substantial.context import Context
from substantial.workflow import workflow

_t0 = time.monotonic()


def say(message: str) -> None:
    """Print one narrated line with the time since the demo began."""
    click.echo(f"[{time.monotonic() - _t0:6.2f}s] {message}")


def roulette() -> int:
    """Fail one time in six, like the README's step; the engine retries it."""
    if random.random() < 1 / 6:
        say("  step roulette: shot! (the failure is recorded, the step is retried)")
        raise Exception("shot!")
    say("  step roulette: survived, result 100")
    return 100


def multiply(a: float, b: float) -> float:
    """Multiply, loudly."""
    say(f"  step multiply: {a} * {b} = {a * b}")
    return a * b


@dataclass
class State:
    """What the cancel handler changes."""

    cancelled: bool = False

    def update(self) -> None:
        """Mark as cancelled."""
        say("  handler: 'cancel' event received")
        self.cancelled = True


SLEEP = timedelta(seconds=2)


@workflow(name="readme-example")
async def example(c: Context) -> float:
    """Run the README's example workflow."""
    res: float = await c.save(roulette)

    c.log("sleeping durably")
    await c.sleep(SLEEP)
    res = await c.save(lambda: multiply(res, 0.5))

    n = await c.receive("by")
    res = await c.save(lambda: multiply(res, n))

    s = State(cancelled=False)
    c.handle("cancel", lambda _: s.update())

    await c.ensure(lambda: s.cancelled)
    return res


async def run_demo(url: str, sleep_s: float) -> None:
    """Start the example on ``url``, send it its events, and print what happens."""
    global SLEEP
    SLEEP = timedelta(seconds=sleep_s)
    conductor = Conductor(url)
    conductor.register(example)
    say(f"backend: {conductor.backend.describe()}")
    agent = conductor.run()
    try:
        run = await conductor.start(example)
        say(f"started run {run.run_id}; every step is recorded in its log")
        say(
            f"the workflow sleeps {sleep_s}s durably: the timer is in the log, so any worker "
            "resumes the run on time, even after a crash"
        )
        await asyncio.sleep(sleep_s + 0.5)
        say("sending event 'by' = 2")
        await run.send("by", 2)
        await asyncio.sleep(0.5)
        say("sending event 'cancel'")
        await run.send("cancel")
        output = await run.result(timeout=60)
        say(f"final output: {output}")
        info = await run.status()
        say(f"run status: {info.status}. Inspect its log with:")
        click.echo(f"    substantial runs show {run.run_id} --backend {url}")
    finally:
        agent.cancel()
        await agent
        await conductor.close()
