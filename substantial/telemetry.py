"""OpenTelemetry spans and metrics, trace context across processes, and structured logs.

Off by default. :func:`enable` (needs the ``otel`` extra) makes every worker
in the process emit spans and metrics through OpenTelemetry:

* ``run <workflow>``: one per *run attempt*, from the moment a worker takes
  the run until it ends, is handed back, or is lost to another worker;
* ``step <name>``: one per *attempt* of a step (or compensation), a child of
  its run's span, ending when the step function returns or raises.

Attributes: ``substantial.run_id``, ``substantial.workflow``,
``substantial.step``, ``substantial.attempt``, ``substantial.outcome``. A step
or run that raises records the exception and sets the span's status to error.

Metrics (OpenTelemetry counters and histograms, unit ``s`` for times):
``substantial.step.attempts`` and ``substantial.step.duration`` by workflow,
step and outcome; ``substantial.runs.started`` by workflow;
``substantial.runs.ended`` by workflow and status; ``substantial.runs.held``
(the runs this process's workers hold); ``substantial.event.latency`` (from
an event's post to its delivery into the run). Attributes never hold run ids.

Trace context crosses processes through the log: ``conductor.start`` called
inside an active span records its W3C trace context (``traceparent``,
``tracestate``) in the run's start record (field ``trace``), and every
attempt's run span is a child of it, whichever worker runs it. A child run's
start record carries its parent's run span, and a ``continue_using``
successor the span of the run it continues, so a whole tree of runs is one
trace. A run started outside any span gets a trace of its own.

:func:`enable_log_context` (or :func:`use_json_logs`, or ``substantial worker
--log-format json``) puts ``run_id``, ``workflow``, ``step`` and ``attempt`` on
every log record emitted while a run's code runs, through :class:`LogContext`;
:class:`JsonFormatter` writes one JSON object per line.

The engine calls this module's hooks (:func:`run`, :func:`step`,
:func:`joined`, :func:`carrier`, the counters) only when :data:`on` is true:
with everything off, its cost is reading one module attribute, and
OpenTelemetry is never imported.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Awaitable, Mapping
from datetime import UTC, datetime
from typing import IO, Any, Protocol, TypeVar

import orjson

from substantial._metrics import Instruments
from substantial.errors import InvalidArgument
from substantial.replay import Evicted, Fenced

__all__ = [
    "JsonFormatter",
    "LogContext",
    "carrier",
    "current",
    "disable",
    "enable",
    "enable_log_context",
    "event_delivered",
    "joined",
    "on",
    "run",
    "run_ended",
    "run_started",
    "step",
    "use_json_logs",
]

T = TypeVar("T")

#: True when spans or log context are enabled; the engine's hooks check this first.
on: bool = False
_tracer: Any = None
_metrics: Instruments | None = None
_log_context = False


class _Held(Protocol):
    """What the worker knows of a run it holds (its ``LiveRun``)."""

    run_id: str
    info: Any


class _Command(Protocol):
    name: str | None
    c: int


_run: contextvars.ContextVar[_Held | None] = contextvars.ContextVar("substantial_run", default=None)
_step: contextvars.ContextVar[tuple[str, int] | None] = contextvars.ContextVar(
    "substantial_step", default=None
)


class _Attempt:
    """The span of one run attempt, opened once the run's start record is read."""

    __slots__ = ("begun", "span", "token", "tracer")

    def __init__(self, tracer: Any) -> None:
        self.tracer = tracer
        self.begun = time.time_ns()
        self.span: Any = None
        self.token: Any = None


_attempt: contextvars.ContextVar[_Attempt | None] = contextvars.ContextVar(
    "substantial_attempt", default=None
)


def enable(tracer_provider: Any = None, meter_provider: Any = None) -> None:
    """Emit spans and metrics of runs, steps and events (the global providers by default)."""
    global _tracer, _metrics, on
    try:
        from opentelemetry import metrics, trace
    except ModuleNotFoundError as exc:
        raise InvalidArgument(
            "tracing needs OpenTelemetry: pip install 'substantial[otel]'"
        ) from exc
    _tracer = trace.get_tracer("substantial", tracer_provider=tracer_provider)
    _metrics = Instruments(metrics.get_meter("substantial", meter_provider=meter_provider))
    on = True


def disable() -> None:
    """Stop emitting spans and metrics and adding log context: back to the default."""
    global _tracer, _metrics, _log_context, on
    _tracer = None
    _metrics = None
    _log_context = False
    on = False


def enable_log_context() -> None:
    """Put the run id, workflow, step and attempt on log records (see :class:`LogContext`)."""
    global _log_context, on
    _log_context = True
    on = True


def current() -> dict[str, Any]:
    """Return what the code running now works on: ``run_id``, ``workflow``, ``step``, ``attempt``.

    Empty outside a run, or when neither spans nor log context are enabled.
    """
    held = _run.get()
    if held is None:
        return {}
    out: dict[str, Any] = {"run_id": held.run_id}
    if held.info is not None:
        out["workflow"] = held.info.workflow
    step_now = _step.get()
    if step_now is not None:
        out["step"], out["attempt"] = step_now
    return out


def _workflow(held: _Held) -> str | None:
    return None if held.info is None else str(held.info.workflow)


def carrier() -> dict[str, str] | None:
    """Return the current span's W3C trace context, to store in a start record; None if none.

    None too when tracing is off: then OpenTelemetry is not even imported.
    """
    if _tracer is None:
        return None
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    out: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(out)
    return out or None


def _parent(trace_context: Any) -> Any:
    """Return the OpenTelemetry context a start record's ``trace`` names (or a new trace's)."""
    from opentelemetry.context import Context as OtelContext
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    if not isinstance(trace_context, dict):
        return OtelContext()  # no trace to continue: the run's spans begin their own
    # The log is data from anywhere: only text fields reach the parser, which ignores
    # anything that is not a well-formed traceparent.
    fields = {k: v for k, v in trace_context.items() if isinstance(k, str) and isinstance(v, str)}
    return TraceContextTextMapPropagator().extract(fields, context=OtelContext())


def _open(attempt: _Attempt, held: _Held, trace_context: Any) -> Any:
    """Open the attempt's span as the current one; it began when the worker took the run."""
    from opentelemetry import context, trace

    span = attempt.tracer.start_span(
        "run",
        context=_parent(trace_context),
        attributes={"substantial.run_id": held.run_id},
        start_time=attempt.begun,
    )
    attempt.span = span
    attempt.token = context.attach(trace.set_span_in_context(span))
    return span


def joined(start: Mapping[str, Any]) -> None:
    """Open the current run attempt's span, continuing the trace its start record names.

    The worker calls this (when :data:`on`) once it has read the run's start
    record, in the run's own task: step spans and child runs started after it
    descend from this span.
    """
    attempt = _attempt.get()
    held = _run.get()
    if attempt is not None and attempt.span is None and held is not None:
        _open(attempt, held, start.get("trace"))


async def run(work: Awaitable[T], held: _Held) -> T:
    """Run one attempt of a run (the worker's whole hold on it) inside its span."""
    # Not reset afterwards: this task is the run's own, and the worker's log lines about
    # how the attempt ended come after it.
    _run.set(held)
    if _tracer is None:
        return await work
    attempt = _Attempt(_tracer)
    _attempt.set(attempt)
    outcome = "done"
    error: Exception | None = None
    instruments = _metrics
    if instruments is not None:
        instruments.runs_held.add(1)
    try:
        return await work
    except Evicted:
        outcome = "handed back"
        raise
    except Fenced:
        outcome = "fenced"
        raise
    except BaseException as exc:
        outcome = "stopped" if not isinstance(exc, Exception) else "error"
        if isinstance(exc, Exception):
            error = exc
        raise
    finally:
        # An attempt that ended before reading the start record (nothing to run yet, an
        # unreadable log) still gets its span, in a trace of its own.
        span = attempt.span if attempt.span is not None else _open(attempt, held, None)
        if attempt.token is not None:
            from opentelemetry import context

            context.detach(attempt.token)
        if error is not None:
            _record_error(span, error)
        workflow = _workflow(held)
        if workflow is not None:
            span.update_name(f"run {workflow}")
            span.set_attribute("substantial.workflow", workflow)
        span.set_attribute("substantial.outcome", outcome)
        span.end()
        if instruments is not None:
            instruments.runs_held.add(-1)


async def step(work: Awaitable[T], held: Any, command: _Command, attempt: int) -> T:
    """Run one attempt of a step inside its span; ``held`` is the run's execution."""
    name = str(command.name)
    _step.set((name, attempt))  # this task is the step's own: its retry warning reads it
    tracer = _tracer
    if tracer is None:
        return await work
    attributes: dict[str, Any] = {
        "substantial.run_id": str(getattr(held, "run_id", "")),
        "substantial.step": name,
        "substantial.attempt": attempt,
        "substantial.command": command.c,
    }
    running = _run.get()
    workflow = None if running is None else _workflow(running)
    if workflow is not None:
        attributes["substantial.workflow"] = workflow
    instruments = _metrics
    with tracer.start_as_current_span(
        f"step {name}",
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        began = time.perf_counter()
        try:
            value = await work
        except Exception as exc:
            span.set_attribute("substantial.outcome", "error")
            _record_error(span, exc)
            if instruments is not None:
                instruments.step(workflow, name, "error", time.perf_counter() - began)
            raise
        span.set_attribute("substantial.outcome", "ok")
        if instruments is not None:
            instruments.step(workflow, name, "ok", time.perf_counter() - began)
        return value


def run_started(workflow: str) -> None:
    """Count a run this process created (a start, a child, a successor)."""
    if _metrics is not None:
        _metrics.runs_started.add(1, {"substantial.workflow": workflow})


def run_ended(workflow: str, status: str) -> None:
    """Count a run whose end a worker of this process recorded."""
    if _metrics is not None:
        attributes = {"substantial.workflow": workflow, "substantial.status": status}
        _metrics.runs_ended.add(1, attributes)


def event_delivered(posted_at: float) -> None:
    """Record how long an event waited between its post and its delivery into the run."""
    if _metrics is not None:
        running = _run.get()
        workflow = None if running is None else _workflow(running)
        attributes = {} if workflow is None else {"substantial.workflow": workflow}
        _metrics.event_latency.record(max(0.0, time.time() - posted_at), attributes)


def _record_error(span: Any, exc: BaseException) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.record_exception(exc)
    span.set_status(Status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}"))


class LogContext(logging.Filter):
    """Add ``run_id``, ``workflow``, ``step`` and ``attempt`` to records logged inside a run.

    Attach it to a handler (a logger's own filters do not see records of its children).
    A field the call already gave in ``extra`` is left as given.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Add the fields; never drop a record."""
        for key, value in current().items():
            if not hasattr(record, key):
                setattr(record, key, value)
        return True


_STANDARD = set(vars(logging.LogRecord("x", 0, "x", 0, "x", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object: time, level, logger, message, then every ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out, default=repr).decode()


def use_json_logs(level: int = logging.INFO, stream: IO[str] | None = None) -> logging.Handler:
    """Log as JSON lines to ``stream`` (stderr) with run context; return the handler added."""
    enable_log_context()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(LogContext())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
