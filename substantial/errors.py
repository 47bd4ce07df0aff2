"""The one exception tree of Substantial.

::

    SubstantialError
    ├── BackendError                 storage said no, or could not be reached
    │   ├── BackendUnavailable       the store is down or timed out; retry later
    │   ├── PositionTaken            another writer extended the log first (fencing)
    │   ├── CorruptRecord            a stored record cannot be decoded
    │   ├── ProtocolMismatch         data written by an incompatible protocol version
    │   └── Unsupported              the backend lacks an optional capability (delete)
    ├── InvalidArgument              bad input from the caller (also a ValueError)
    ├── SerializationError           a value cannot be stored as JSON (also a TypeError)
    ├── UnknownWorkflow              no registered workflow has that name
    ├── RunNotFound                  no run has that id
    ├── RunConflict                  a run with that id exists with other arguments
    ├── NonDeterminismError          replay asked for a different step than the log holds
    ├── WorkflowMisuse               workflow code called something replay cannot repeat
    ├── WorkflowTimeout              the run's deadline passed (raised inside the workflow)
    ├── ChildFailed                  a child run ended in failure, cancellation or timeout
    ├── StepFailed                   a ``save`` step failed after its last retry
    ├── StepTimeout                  a ``save`` step ran longer than its timeout
    ├── ReceiveTimeout               ``receive`` waited longer than its timeout
    ├── WorkflowFailed               ``result()`` of a run that ended in failure
    ├── RunCancelled                 ``result()`` of a cancelled run
    ├── RunReverted                  ``result()`` of a reverted run
    └── ResultTimeout                ``result(timeout=...)`` expired first

Driver errors are translated in one place per backend with
``raise Mapped(msg) from exc`` so callers only ever see this tree.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BackendError",
    "BackendUnavailable",
    "ChildFailed",
    "CorruptRecord",
    "InvalidArgument",
    "NonDeterminismError",
    "PositionTaken",
    "ProtocolMismatch",
    "ReceiveTimeout",
    "ResultTimeout",
    "RunCancelled",
    "RunConflict",
    "RunNotFound",
    "RunReverted",
    "SerializationError",
    "StepFailed",
    "StepTimeout",
    "SubstantialError",
    "UnknownWorkflow",
    "Unsupported",
    "WorkflowFailed",
    "WorkflowMisuse",
    "WorkflowTimeout",
]


class SubstantialError(Exception):
    """Base class of every error Substantial raises."""


class BackendError(SubstantialError):
    """The storage backend refused an operation or could not perform it."""


class BackendUnavailable(BackendError):
    """The store could not be reached or did not answer in time.

    Nothing was written, or the write is idempotent and can be retried as is.
    """


class PositionTaken(BackendError):
    """Another writer already holds this position of the run's log.

    This is the fencing signal: the writer that gets it has lost the run and
    must stop extending its log.
    """

    def __init__(self, run_id: str, position: int) -> None:
        super().__init__(
            f"position {position} of run {run_id!r} is already written by another writer; "
            "this worker no longer owns the run and must re-read its log"
        )
        self.run_id = run_id
        self.position = position


class CorruptRecord(BackendError):
    """A stored log entry, event or metadata record cannot be decoded."""

    def __init__(self, run_id: str, position: int | str, detail: str) -> None:
        super().__init__(
            f"record {position} of run {run_id!r} is corrupt ({detail}); "
            "the rest of the log is intact: inspect it with `substantial runs show`, "
            "restore the record from a backup, or cancel the run"
        )
        self.run_id = run_id
        self.position = position


class ProtocolMismatch(BackendError):
    """Data was written with a storage protocol this version cannot read."""


class Unsupported(BackendError, NotImplementedError):
    """The backend does not offer an optional capability (see ``Backend.capabilities``)."""


class InvalidArgument(SubstantialError, ValueError):
    """The caller passed a value Substantial cannot accept."""


class SerializationError(SubstantialError, TypeError):
    """A value cannot be encoded as JSON for the log; nothing was written."""


class UnknownWorkflow(SubstantialError):
    """A run names a workflow that no registered function provides."""


class RunNotFound(SubstantialError):
    """No run with that id exists in the backend."""


class RunConflict(SubstantialError):
    """``start(run_id=...)`` names an existing run that has other arguments or workflow."""


class NonDeterminismError(SubstantialError):
    """Replay asked for a different primitive than the log recorded.

    The workflow's code changed in a way that is incompatible with runs
    already in flight, or it branches on something that is not recorded
    (wall clock, randomness, I/O outside ``save``). ``command`` is the number
    of the primitive call (in the order the workflow issued them) and
    ``position`` the log entry holding the recorded one.
    """

    def __init__(
        self, run_id: str, position: int, recorded: Any, requested: Any, command: int | None = None
    ) -> None:
        at = (
            f"command {command} (log position {position})"
            if command is not None
            else (f"log position {position}")
        )
        super().__init__(
            f"run {run_id!r} is not deterministic at {at}: the log recorded "
            f"{recorded}, but the code now asks for {requested}. Keep the old code registered "
            "for runs in flight (give the changed workflow a new version=, see "
            "docs/versioning.md), or cancel the run."
        )
        self.run_id = run_id
        self.position = position
        self.command = command
        self.recorded = recorded
        self.requested = requested


class WorkflowMisuse(SubstantialError):
    """Workflow code called something whose result replay could not reproduce.

    The message names the call and what to use instead (``c.sleep``,
    ``c.now``, ``c.save``).
    """


class WorkflowTimeout(SubstantialError):
    """The run's deadline passed; raised inside the workflow so cleanup can run."""


class ChildFailed(SubstantialError):
    """A child run did not complete: it failed, was cancelled, reverted or timed out."""

    def __init__(self, run_id: str, status: str, error_type: str | None, message: str) -> None:
        detail = f": {error_type}: {message}" if error_type else (f": {message}" if message else "")
        super().__init__(f"child run {run_id!r} ended {status}{detail}")
        self.run_id = run_id
        self.status = status
        self.error_type = error_type
        self.message = message


class StepFailed(SubstantialError):
    """A ``save`` step raised on its last attempt; the failure is recorded."""

    def __init__(self, step: str, error_type: str, message: str, attempts: int) -> None:
        super().__init__(
            f"step {step!r} failed after {attempts} attempt(s): {error_type}: {message}"
        )
        self.step = step
        self.error_type = error_type
        self.message = message
        self.attempts = attempts


class StepTimeout(SubstantialError):
    """A ``save`` step ran longer than its ``timeout``."""


class ReceiveTimeout(SubstantialError):
    """``receive`` waited longer than its ``timeout`` for an event."""


class WorkflowFailed(SubstantialError):
    """The run ended because the workflow raised (or its deadline passed)."""

    def __init__(
        self, run_id: str, error_type: str, message: str, traceback: list[str] | None = None
    ) -> None:
        super().__init__(f"run {run_id!r} failed: {error_type}: {message}")
        self.run_id = run_id
        self.error_type = error_type
        self.message = message
        #: Where the workflow raised, innermost frame last, as the log recorded it.
        self.traceback = traceback or []


class RunCancelled(SubstantialError):
    """The run was cancelled before it finished."""


class RunReverted(SubstantialError):
    """The run called ``revert()``: its compensations ran and it ended."""


class ResultTimeout(SubstantialError, TimeoutError):
    """``result(timeout=...)`` expired before the run finished."""
