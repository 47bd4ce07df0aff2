"""docs/steps.md: `save` with sync and async steps, retries, timeouts, names and keys."""

import asyncio
import functools
import threading

from substantial import Conductor, Context, RetryPolicy, StepFailed, workflow
from substantial.records import decode_entry

calls: dict[str, int] = {}


def counted(name: str) -> int:
    calls[name] = calls.get(name, 0) + 1
    return calls[name]


def load_config() -> dict[str, int]:
    counted("load_config")
    return {"fee": 3}


async def fetch_price(sku: str) -> int:
    counted("fetch_price")
    await asyncio.sleep(0.01)  # stands for an HTTP call
    return 40


def charge_card() -> str:
    if counted("charge_card") < 3:  # the first two attempts fail
        raise ConnectionError("payment gateway unreachable")
    return "ch_123"


async def check_stock() -> int:
    await asyncio.sleep(10)  # far longer than the step's timeout
    return 7


def call_upstream() -> str:
    raise TimeoutError("upstream read timed out")  # the step's own timeout, not ours


def quote() -> tuple[int, str]:
    return (40, "EUR")  # a tuple: the workflow gets the JSON of it, a list


def off_the_event_loop() -> bool:
    return threading.current_thread() is not threading.main_thread()


@workflow()
async def checkout(c: Context, sku: str, quantity: int = 1) -> dict[str, object]:
    config = await c.save(load_config, key="config")
    price = await c.save(functools.partial(fetch_price, sku), name="fetch-price")
    total = await c.save(lambda: price * quantity + config["fee"], name="total")
    charge = await c.save(charge_card, retry=RetryPolicy(max_attempts=5, initial_delay=0.01))
    once = RetryPolicy(max_attempts=1)
    via_lambda = upstream = "no error"
    try:
        stock: object = await c.save(check_stock, timeout=0.05, retry=once)
    except StepFailed as exc:
        stock = f"{exc.error_type} after {exc.attempts} attempt(s)"
    try:  # a lambda returning a coroutine is bounded by the timeout too
        await c.save(lambda: check_stock(), timeout=0.05, retry=once, name="stock-via-lambda")
    except StepFailed as exc:
        via_lambda = f"{exc.error_type}: {exc.message}"
    try:
        await c.save(call_upstream, timeout=5, retry=once)
    except StepFailed as exc:
        upstream = f"{exc.error_type}: {exc.message}"
    pair = await c.save(quote)
    threaded = await c.save(off_the_event_loop, timeout=5, name="sync-with-timeout")
    threaded_too = await c.save(off_the_event_loop, name="sync-without-timeout")
    again = await c.save(load_config, key="config")  # memoized: not run, not recorded again
    return {
        "total": total,
        "charge": charge,
        "stock": stock,
        "stock via a lambda": via_lambda,
        "upstream": upstream,
        "a tuple step handed the workflow": f"{type(pair).__name__} {pair}",
        "sync step with timeout ran in a thread": threaded,
        "the same quick function ran on the loop the second time": not threaded_too,
        "keyed step returned the first value": again == config,
    }


async def main() -> None:
    conductor = Conductor("memory://")
    conductor.register(checkout)
    agent = conductor.run()
    run = await conductor.start(checkout, {"sku": "book", "quantity": 2}, run_id="checkout-1")
    result = await run.result(timeout=10)
    agent.cancel()
    await agent

    for key, value in result.items():
        print(f"{key}: {value}")
    print("calls:", calls)
    print("log:")
    for position, entry in enumerate(await conductor.backend.read_log(run.run_id)):
        for record in decode_entry(run.run_id, position, entry):
            detail = record.get("name", "")
            if record["k"] == "attempt":
                detail += f" #{record['n']} {record['error']['type']}"
            if record["k"] == "step" and "error" in record:
                detail += f" failed: {record['error']['type']}"
            print(f"  {position}: {record['k']} {detail}".rstrip())


if __name__ == "__main__":
    asyncio.run(main())
