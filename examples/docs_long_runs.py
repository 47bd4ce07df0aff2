"""docs/long-runs.md: continue_using chains runs; compact keeps one run's replay short."""

import asyncio

from substantial import Conductor, Context, workflow
from substantial.records import decode_entry

PAGES = [["a", "b"], ["c"], ["d", "e", "f"], []]
setup_calls: list[int] = []


def fetch_page(page: int) -> list[str]:
    return PAGES[page]  # stands for an API call


@workflow()
async def export(c: Context, page: int = 0, exported: int = 0) -> int:
    items = await c.save(lambda: fetch_page(page), name="fetch-page")
    if not items:
        return exported
    # End this run and start `export+1` (then +2, ...) with a fresh, short log.
    await c.continue_using(export, page=page + 1, exported=exported + len(items))
    raise AssertionError("continue_using never returns")


@workflow()
async def mailroom(c: Context, hops: int = 2) -> list[object]:
    if hops:  # pass the run on twice: mail -> mail+1 -> mail+2
        await c.continue_using(mailroom, hops=hops - 1)
    return [await c.receive("letter"), await c.receive("letter")]


def open_account() -> str:
    setup_calls.append(1)
    return "acct-1"


@workflow()
async def ledger(c: Context, balance: int = 0, entries: int = 0) -> dict[str, object]:
    account = await c.save(open_account, key="account")  # runs once, carried by snapshots
    while True:
        amount = await c.receive("entry")
        if amount is None:
            return {"account": account, "balance": balance, "entries": entries}
        balance += amount
        entries += 1
        if entries % 3 == 0:
            # Restart from the top with this state; replay now starts here.
            await c.compact(balance=balance, entries=entries)


async def wait_until_continued(conductor: Conductor, run_id: str) -> None:
    """Wait (up to 10 s) until the run exists and has continued."""
    for _ in range(1000):
        info = await conductor.backend.get_run(run_id)
        if info is not None and info.status == "continued":
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(f"{run_id} never continued")


async def main() -> None:
    conductor = Conductor("memory://")
    conductor.register(export)
    conductor.register(ledger)
    conductor.register(mailroom)
    books = await conductor.start(ledger, run_id="books")
    for amount in [5, -2, 10, 7, 1, -4, 3, None]:  # queued in the inbox before a worker runs
        await books.send("entry", amount)
    post = await conductor.start(mailroom, run_id="mail")
    await post.send("letter", "before")  # in mail's inbox: forwarded along the chain
    agent = conductor.run()

    run = await conductor.start(export, run_id="export")
    print("exported:", await run.result(timeout=10))  # result() follows the chain
    for run_id in ["export", "export+1", "export+2", "export+3"]:
        info = await conductor.get(run_id).status()
        print(f"  {run_id}: {info.status} {info.output}")

    await wait_until_continued(conductor, "mail+1")
    await post.send("letter", "after")  # sent to "mail", which has continued: goes to mail+2
    print("letters sent to 'mail', received by mail+2:", await post.result(timeout=10))

    print("ledger:", await books.result(timeout=10))
    entries = await conductor.backend.read_log("books")
    kinds = [r["k"] for p, e in enumerate(entries) for r in decode_entry("books", p, e)]
    info = await books.status()
    print("snapshots:", kinds.count("snapshot"), "| setup ran:", len(setup_calls), "time(s)")
    at_start = decode_entry("books", info.log_start, entries[info.log_start])
    # A worker reads from log_start: the entry there holds the snapshot.
    print("replay starts at a snapshot:", any(r["k"] == "snapshot" for r in at_start))
    print("entries before it are still stored:", info.log_start, "of", len(entries))

    agent.cancel()
    await agent


if __name__ == "__main__":
    asyncio.run(main())
