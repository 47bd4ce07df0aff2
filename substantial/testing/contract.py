"""The Backend contract as a test suite: a backend, ours or yours, tests itself with it.

Subclass :class:`BackendContract` in a pytest module and define one fixture,
``store``, returning a :class:`Store`::

    import pytest
    from substantial.testing.contract import BackendContract, Store

    class TestToyBackend(BackendContract):
        @pytest.fixture
        def store(self, tmp_path):
            return Store.from_url(f"toy://{tmp_path}")

Every test then runs on that backend: the log's fencing (many appenders at
one position, in one process and across processes: exactly one wins), the
inbox, the due index, leases, metadata, newest-first listing, wake-ups and
deletes as the backend declares them, and the answers to bad input that
every backend gives alike. Tests that need other processes to open the same store run only when
``Store.url`` is set. The suite needs ``pytest`` and ``pytest-asyncio``
(``pip install 'substantial[testing]'``).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from substantial.backends.base import Backend
from substantial.testing._suite_delete import DeleteTests
from substantial.testing._suite_index import DueTests, InboxTests
from substantial.testing._suite_log import LogTests
from substantial.testing._suite_recent import RecentTests
from substantial.testing._suite_runs import LeaseTests, LifecycleTests, RunTests
from substantial.testing._support import Opener, Store

__all__ = ["BackendContract", "Store"]


@pytest.mark.asyncio
class BackendContract(
    LogTests,
    InboxTests,
    DueTests,
    LeaseTests,
    RunTests,
    LifecycleTests,
    DeleteTests,
    RecentTests,
):
    """The conformance suite; subclass it and define the ``store`` fixture."""

    @pytest.fixture
    def store(self) -> Store:
        """Return the store under test (override this fixture)."""
        pytest.fail(
            f"{type(self).__name__} must define a `store` fixture returning "
            "substantial.testing.contract.Store"
        )

    @pytest_asyncio.fixture
    async def open_client(self, store: Store) -> AsyncIterator[Opener]:
        """Yield a function that opens one more client of the store; close them all after."""
        opened: dict[int, Backend] = {}

        async def open_() -> Backend:
            made = store.open()
            backend = await made if inspect.isawaitable(made) else made
            assert isinstance(backend, Backend), f"Store.open returned {backend!r}"
            opened[id(backend)] = backend
            return backend

        yield open_
        for backend in opened.values():
            await backend.close()

    @pytest_asyncio.fixture
    async def backend(self, open_client: Opener) -> Backend:
        """Return one client of the store."""
        return await open_client()
