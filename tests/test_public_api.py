"""The public surface: one sorted __all__, complete, and the testing helpers."""

from __future__ import annotations

import types

import substantial
from substantial import Context, workflow
from substantial.testing import log_records, running


def test_all_is_sorted_and_complete() -> None:
    assert substantial.__all__ == sorted(substantial.__all__)
    public = {n for n in dir(substantial) if not n.startswith("_")}
    # Submodules become attributes once anything imports them (the CLI, the UI, a test):
    # they are not stray public names.
    modules = {n for n in public if isinstance(getattr(substantial, n), types.ModuleType)}
    assert set(substantial.__all__) <= public
    assert public - modules - set(substantial.__all__) == set()
    for name in substantial.__all__:
        assert getattr(substantial, name).__doc__, f"{name} has no docstring"


def test_errors_form_one_tree() -> None:
    for name in substantial.__all__:
        obj = getattr(substantial, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, substantial.SubstantialError)


@workflow()
async def greeter(c: Context, greeting: str = "hello") -> str:
    return f"{greeting}, {await c.receive('name')}"


async def test_running_helper() -> None:
    async with running(greeter) as conductor:
        run = await conductor.start(greeter)
        await run.send("name", "ada")
        assert await run.result(timeout=5) == "hello, ada"
        kinds = [r["k"] for r in await log_records(conductor.backend, run.run_id)]
        assert kinds == ["start", "event", "end"]
