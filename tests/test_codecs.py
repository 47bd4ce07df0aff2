"""Payload codecs: the store holds no plaintext of a run's values; a wrong key changes nothing."""

from __future__ import annotations

from pathlib import Path

import pytest

from substantial import Conductor, Context, workflow
from substantial.codecs import Chain, CodecError, Compress, Encrypt
from substantial.errors import CorruptRecord, InvalidArgument
from tests.harness import Harness

SECRET = "4111-1111-1111-1111"


@workflow()
async def pay(c: Context, card: str) -> dict[str, str]:
    token = await c.save(lambda: f"tok:{card}", name="tokenize")
    c.publish("last4", card[-4:] + "|" + card)
    c.emit("audit", card)
    note = await c.receive("note")
    return {"token": token, "note": note}


async def raw_store_bytes(harness: Harness, run_id: str) -> bytes:
    """Everything the store holds for the run, read without any codec."""
    plain = await harness.open()
    out = b"".join(await plain.read_log(run_id))
    out += b"".join(e.data for e in await plain.read_inbox(run_id))
    info = await plain.get_run(run_id)
    out += info.to_bytes() if info is not None else b""
    await plain.close()
    return out


async def test_the_store_holds_no_plaintext_and_the_run_sees_its_values(harness: Harness) -> None:
    key = Encrypt.generate_key()
    conductor = Conductor(await harness.open(), codec=Chain(Compress(), Encrypt(key)))
    conductor.register(pay)
    agent = conductor.run(poll_interval=0.2)
    run = await conductor.start(pay, {"card": SECRET}, run_id="pay-1")
    assert await run.read("last4", timeout=10) == "1111|" + SECRET
    await run.send("note", f"paid with {SECRET}")
    assert await run.result(timeout=10) == {"token": f"tok:{SECRET}", "note": f"paid with {SECRET}"}
    assert [v async for v in run.stream("audit")] == [SECRET]
    agent.cancel()
    await agent
    held = await raw_store_bytes(harness, "pay-1")
    assert SECRET.encode() not in held and b"1111-1111" not in held
    assert b"tokenize" in held  # names and kinds stay readable
    await conductor.close()


async def test_a_wrong_key_gives_a_clear_error_and_changes_nothing(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'runs.db'}"
    right = Conductor(url, codec=Encrypt(Encrypt.generate_key()))
    right.register(pay)
    agent = right.run(poll_interval=0.2)
    await right.start(pay, {"card": SECRET}, run_id="pay-2")
    while len(await right.backend.read_log("pay-2")) < 2:
        await right.backend.wait_for_work(0.01)
    agent.cancel()
    await agent
    before = await raw_store_bytes_url(url, "pay-2")
    wrong = Conductor(url, codec=Encrypt(Encrypt.generate_key()))
    wrong.register(pay)
    with pytest.raises(CorruptRecord, match="which this codec does not hold"):
        await wrong.get("pay-2").status()
    agent = wrong.run(poll_interval=0.1)
    await wrong.backend.schedule("pay-2", 0.0)  # make a worker with the wrong key try it
    for _ in range(20):
        await wrong.backend.wait_for_work(0.05)
    agent.cancel()
    await agent
    assert await raw_store_bytes_url(url, "pay-2") == before
    listed = await wrong.list()
    assert [(i.run_id, i.status) for i in listed] == [("pay-2", "corrupt")]
    # Newest first from the store's index: the run keeps the place (and cursor) it has there.
    (newest,) = await wrong.list(newest_first=True)
    stored = await right.get("pay-2").status()
    assert (newest.status, newest.created_at) == ("corrupt", stored.created_at)
    await right.close()
    await wrong.close()


async def raw_store_bytes_url(url: str, run_id: str) -> bytes:
    plain = Conductor(url).backend
    out = b"".join(await plain.read_log(run_id))
    info = await plain.get_run(run_id)
    out += info.to_bytes() if info is not None else b""
    await plain.close()
    return out


def test_keys_rotate_and_bad_keys_are_refused() -> None:
    old, new = Encrypt.generate_key(), Encrypt.generate_key()
    sealed = Encrypt(old).encode(b"value")
    assert Encrypt(new, old_keys=(old,)).decode(sealed) == b"value"
    with pytest.raises(CodecError, match="does not hold: pass that key in old_keys"):
        Encrypt(new).decode(sealed)
    tampered = sealed[:-1] + bytes([sealed[-1] ^ 1])
    with pytest.raises(CodecError, match="was changed in the store"):
        Encrypt(old).decode(tampered)
    with pytest.raises(InvalidArgument, match="32 bytes"):
        Encrypt(b"short")
