"""Retry policies that choose which exceptions to retry, and a workflow's default policy."""

from __future__ import annotations

from typing import Any

import pytest

from substantial import Conductor, Context, InvalidArgument, RetryPolicy, StepFailed, workflow
from substantial.backends.memory import MemoryBackend

calls: dict[str, int] = {}


def failing(name: str, exc: BaseException) -> Any:
    def step() -> None:
        calls[name] = calls.get(name, 0) + 1
        raise exc

    step.__qualname__ = name
    return step


FAST = {"initial_delay": 0.0}


@workflow()
async def choosy(c: Context) -> dict[str, str]:
    out = {}
    only_network = RetryPolicy(max_attempts=4, retry_on=(ConnectionError, TimeoutError), **FAST)
    never_auth = RetryPolicy(max_attempts=4, no_retry_on=PermissionError, **FAST)
    cases = [
        ("value-error", ValueError("bad input"), only_network),
        ("conn-error", ConnectionRefusedError("down"), only_network),
        ("denied", PermissionError("no"), never_auth),
        ("flaky", OSError("flaky"), never_auth),
    ]
    for name, exc, policy in cases:
        try:
            await c.save(failing(name, exc), retry=policy)
        except StepFailed as err:
            out[name] = f"{err.error_type} after {err.attempts}"
    return out


@workflow(retry=RetryPolicy(max_attempts=2, **FAST))
async def defaulted(c: Context) -> list[str]:
    out = []
    for name, policy in (("default", None), ("own", RetryPolicy(max_attempts=3, **FAST))):
        try:
            await c.save(failing(name, RuntimeError("nope")), retry=policy)
        except StepFailed as err:
            out.append(f"{name}: {err.attempts}")
    return out


async def run(wf: Any) -> Any:
    conductor = Conductor(MemoryBackend())
    conductor.register(wf)
    agent = conductor.run()
    try:
        return await (await conductor.start(wf)).result(timeout=20)
    finally:
        agent.cancel()
        await agent


async def test_only_the_chosen_exceptions_are_retried() -> None:
    calls.clear()
    assert await run(choosy) == {
        "value-error": "ValueError after 1",
        "conn-error": "ConnectionRefusedError after 4",
        "denied": "PermissionError after 1",
        "flaky": "OSError after 4",
    }
    assert calls == {"value-error": 1, "conn-error": 4, "denied": 1, "flaky": 4}


async def test_a_workflow_default_policy_applies_to_steps_without_their_own() -> None:
    calls.clear()
    assert await run(defaulted) == ["default: 2", "own: 3"]
    assert calls == {"default": 2, "own": 3}


def test_bad_retry_settings_are_refused_clearly() -> None:
    with pytest.raises(
        InvalidArgument, match=r"RetryPolicy\(retry_on=...\) takes exception classes"
    ):
        RetryPolicy(retry_on=("ValueError",))  # type: ignore[arg-type]
    with pytest.raises(InvalidArgument, match=r"@workflow\(retry=...\) takes a RetryPolicy"):
        workflow(retry=3)  # type: ignore[arg-type]
