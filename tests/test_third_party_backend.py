"""A backend from another package joins through a URL scheme: entry points and register_backend.

The entry-point tests install a real distribution (a ``*.dist-info`` directory
with ``entry_points.txt``) on ``sys.path``, as pip would, and open it by URL.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from substantial import Conductor, Context, workflow
from substantial.backends import (
    ENTRY_POINT_GROUP,
    _registry,
    from_url,
    known_schemes,
    register_backend,
)
from substantial.backends.memory import MemoryBackend
from substantial.errors import InvalidArgument
from substantial.testing.contract import BackendContract


@pytest.fixture(autouse=True)
def clean_registry() -> Iterator[None]:
    saved = dict(_registry._registered)
    yield
    _registry._registered.clear()
    _registry._registered.update(saved)


def install(site: Path, dist: str, package: str, entry_points: dict[str, str], code: str) -> None:
    """Write a package and its distribution metadata into ``site``, as an installer would."""
    (site / package).mkdir(parents=True)
    (site / package / "__init__.py").write_text(textwrap.dedent(code))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")


TOY = """
    from substantial.backends.memory import MemoryBackend

    class ToyBackend(MemoryBackend):
        name = "toy"

        def __init__(self, url: str) -> None:
            super().__init__()
            self.url = url

        @classmethod
        def from_url(cls, url: str) -> "ToyBackend":
            return cls(url)
"""


async def test_an_installed_package_opens_its_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    install(tmp_path, "toy-store", "toy_store", {"toy": "toy_store:ToyBackend"}, TOY)
    with pytest.raises(InvalidArgument, match="unknown backend URL scheme 'toy'"):
        from_url("toy://somewhere")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "toy" in known_schemes()
    backend = from_url("TOY://somewhere?x=1")
    assert type(backend).__name__ == "ToyBackend"
    assert backend.url == "TOY://somewhere?x=1"  # type: ignore[attr-defined]

    # And it works as a store: a workflow runs on it.
    @workflow(name="third_party_double")
    async def double(c: Context, n: int = 1) -> int:
        return 2 * n

    conductor = Conductor("toy://store")
    conductor.register(double)
    agent = conductor.run()
    try:
        run = await conductor.start(double, {"n": 21})
        assert await run.result(timeout=10) == 42
    finally:
        agent.cancel()
        await agent
        await conductor.close()


async def test_an_entry_point_may_be_a_plain_function(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    code = """
        from substantial.backends.memory import MemoryBackend

        def open_store(url):
            store = MemoryBackend()
            store.opened_with = url
            return store
    """
    install(tmp_path, "fn-store", "fn_store", {"fnstore": "fn_store:open_store"}, code)
    monkeypatch.syspath_prepend(str(tmp_path))
    backend = from_url("fnstore://a/b")
    assert backend.opened_with == "fnstore://a/b"  # type: ignore[attr-defined]


async def test_an_entry_point_cannot_take_a_built_in_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    install(tmp_path, "evil-store", "evil_store", {"s3": "evil_store:ToyBackend"}, TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    caplog.set_level(logging.WARNING, logger="substantial.backend")
    assert known_schemes().count("s3") == 1
    assert any("built-in scheme" in r.getMessage() for r in caplog.records)
    assert type(from_url("memory://")).__name__ == "MemoryBackend"


def test_an_unknown_scheme_lists_the_known_ones() -> None:
    with pytest.raises(InvalidArgument) as err:
        from_url("nosuch://user:hunter2@host/x")
    message = str(err.value)
    assert "unknown backend URL scheme 'nosuch'" in message
    for scheme in ("memory://", "file://", "sqlite://", "redis://", "s3://", "postgresql://"):
        assert scheme in message
    assert ENTRY_POINT_GROUP in message
    assert "hunter2" not in message
    with pytest.raises(InvalidArgument, match="names no scheme"):
        from_url("/var/lib/app")


def test_register_backend_in_process() -> None:
    register_backend("inproc", MemoryBackend)
    assert isinstance(from_url("inproc://"), MemoryBackend)
    register_backend("lazy", "substantial.backends.memory:MemoryBackend")
    assert isinstance(from_url("lazy://"), MemoryBackend)
    assert {"inproc", "lazy"} <= set(known_schemes())
    with pytest.raises(InvalidArgument, match="already registered"):
        register_backend("inproc", MemoryBackend)
    with pytest.raises(InvalidArgument, match="already registered"):
        register_backend("s3", MemoryBackend)
    register_backend("inproc", lambda url: MemoryBackend(), replace=True)
    assert isinstance(from_url("inproc://"), MemoryBackend)
    with pytest.raises(InvalidArgument, match="invalid URL scheme"):
        register_backend("no spaces", MemoryBackend)


def test_a_target_that_is_not_a_backend_is_refused() -> None:
    register_backend("notabackend", lambda url: object())  # type: ignore[arg-type,return-value]
    with pytest.raises(InvalidArgument, match="not a Backend"):
        from_url("notabackend://x")
    register_backend("badtarget", "no_colon_here")
    with pytest.raises(InvalidArgument, match="module:attribute"):
        from_url("badtarget://x")


SUITE_USER = """
import pytest

from substantial.backends.memory import MemoryBackend
from substantial.testing.contract import BackendContract, Store


class TestMyBackend(BackendContract):
    @pytest.fixture
    def store(self):
        shared = MemoryBackend()  # one store; every client the suite opens is this one
        return Store(lambda: shared)
"""


def test_the_shipped_suite_runs_in_another_project_with_one_fixture(tmp_path: Path) -> None:
    # A project of its own: no conftest, pytest-asyncio in strict mode (its default).
    (tmp_path / "test_my_backend.py").write_text(SUITE_USER)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-o",
            "asyncio_mode=strict",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert "failed" not in summary and "error" not in summary, summary
    tests = [name for name in dir(BackendContract) if name.startswith("test_")]
    # The whole suite ran; only the tests that open the store from other processes skip.
    assert summary.startswith(f"{len(tests) - 3} passed, 3 skipped"), summary
