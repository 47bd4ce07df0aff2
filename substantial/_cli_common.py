"""What every command shares: the backend option, one-line errors, safe text, time formats."""

from __future__ import annotations

import asyncio
import importlib
import os
import sys
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any, TypeVar

import click
import orjson
from rich.console import Console
from rich.text import Text

from substantial.backends import from_url
from substantial.backends.base import Backend, ErrorInfo
from substantial.conductor import Conductor
from substantial.errors import BackendUnavailable, SubstantialError
from substantial.timeline import format_duration

T = TypeVar("T")

DEFAULT_BACKEND = "sqlite://./.substantial/substantial.db"
BACKEND_HELP = (
    "Backend URL (memory://, file:///dir, sqlite:///file.db, redis://host, s3://bucket/prefix, "
    f"postgresql://...). Default: $SUBSTANTIAL_BACKEND or {DEFAULT_BACKEND}"
)

#: Colours of run and row states, for people; scripts use --json.
STYLES = {
    "completed": "green",
    "ok": "green",
    "active": "cyan",
    "running": "cyan",
    "waiting": "blue",
    "retrying": "yellow",
    "failed": "bold red",
    "timed_out": "red",
    "corrupt": "bold red",
    "cancelled": "magenta",
    "reverted": "magenta",
    "continued": "blue",
    "info": "",
}

_EXTRAS = {
    "redis": "redis",
    "aiobotocore": "s3",
    "botocore": "s3",
    "asyncpg": "postgres",
    "starlette": "ui",
    "uvicorn": "ui",
    "opentelemetry": "otel",
}


def backend_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--backend URL`` (or $SUBSTANTIAL_BACKEND) to a command."""
    return click.option("--backend", "url", metavar="URL", help=BACKEND_HELP)(fn)


def backend_url(url: str | None) -> str:
    """Return the URL given, else $SUBSTANTIAL_BACKEND, else the embedded default."""
    return url or os.environ.get("SUBSTANTIAL_BACKEND") or DEFAULT_BACKEND


def open_backend(url: str | None) -> Backend:
    """Build the backend a command works on."""
    return from_url(backend_url(url))


def one_line(text: str) -> str:
    """Fold a message onto one line."""
    return " ".join(text.split())


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine; turn every expected failure into one line saying what to do."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        raise click.exceptions.Exit(130) from None
    except BackendUnavailable as exc:
        raise click.ClickException(
            one_line(f"{exc} (is the store running? check --backend or $SUBSTANTIAL_BACKEND)")
        ) from exc
    except SubstantialError as exc:
        raise click.ClickException(one_line(str(exc))) from exc
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        extra = _EXTRAS.get(top)
        if extra is None:
            raise
        raise click.ClickException(
            f"this needs the {top} package: pip install 'substantial[{extra}]'"
        ) from exc
    except OSError as exc:
        raise click.ClickException(one_line(f"{exc} (check --backend and its path)")) from exc


def console(*, stderr: bool = False) -> Console:
    """Return a console; colour only on a terminal, and never markup from data.

    Into a pipe, lines are cut at 160 columns (or $COLUMNS), not a terminal's 80.
    """
    stream = sys.stderr if stderr else sys.stdout
    tty = stream.isatty()
    width = None if tty or os.environ.get("COLUMNS") else 160
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def safe(text: Any) -> str:
    """Make any text printable on a terminal: control characters are shown escaped."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():
        return s
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode() for ch in s)


def plain(text: Any, style: str = "") -> Text:
    """Wrap data as a rich Text: never read as markup, control characters escaped."""
    return Text(safe(text), style=style)


def short_json(value: Any, width: int = 80) -> str:
    """Render a value as compact JSON, cut at ``width`` characters."""
    try:
        text = orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        text = repr(value)
    text = safe(text)
    return text if len(text) <= width else text[: width - 1] + "…"


def error_text(error: ErrorInfo | dict[str, Any] | str | None) -> str:
    """Render a stored error as one line: ``Type: message``."""
    if error is None:
        return ""
    if isinstance(error, dict):
        return safe(f"{error.get('type')}: {error.get('message')}")
    return safe(error)


def clock(ts: float, *, date: bool = False) -> str:
    """Render a time as local wall-clock time, to the millisecond."""
    dt = datetime.fromtimestamp(ts).astimezone()
    return dt.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] if date else dt.strftime("%H:%M:%S.%f")[:-3]


def ago(ts: float, now: float) -> str:
    """Render a time relative to now: ``5m02s ago`` or ``in 3.00s``."""
    delta = now - ts
    return f"{format_duration(delta)} ago" if delta >= 0 else f"in {format_duration(-delta)}"


def relative(ts: float, origin: float) -> str:
    """Render a time relative to a run's start: ``+1.25s``."""
    delta = ts - origin
    return ("+" if delta >= 0 else "-") + format_duration(abs(delta))


def status_text(status: str) -> Text:
    """Return a run status or row state, coloured."""
    return plain(status, STYLES.get(status, ""))


def parse_json_option(value: str | None, option: str) -> Any:
    """Read an option's JSON text, or fail with one line naming the option."""
    if value is None:
        return None
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise click.BadParameter(f"must be JSON: {exc}", param_hint=option) from exc


def load_conductor(target: str) -> Conductor:
    """Import the Conductor named by TARGET (MODULE:ATTRIBUTE), from the current directory too."""
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise click.BadParameter(
            "use MODULE:ATTRIBUTE, e.g. myapp.flows:conductor", param_hint="TARGET"
        )
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise click.BadParameter(
            f"cannot import {module_name!r}: {exc}", param_hint="TARGET"
        ) from exc
    obj = getattr(module, attr, None)
    if not isinstance(obj, Conductor):
        raise click.BadParameter(
            f"{target} is not a Conductor (got {type(obj).__name__})", param_hint="TARGET"
        )
    return obj
