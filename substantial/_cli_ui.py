"""``substantial ui``: serve the web UI for a store."""

from __future__ import annotations

import click

from substantial import _cli_common as common
from substantial.errors import SubstantialError

__all__ = ["ui"]


@click.command("ui")
@common.backend_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8765, show_default=True, help="Port to listen on.")
@click.option(
    "--allow-actions", is_flag=True, help="Allow sending events, cancelling and resuming runs."
)
@click.option(
    "--token",
    envvar="SUBSTANTIAL_UI_TOKEN",
    help="Secret every request must carry; required to listen beyond 127.0.0.1. "
    "Default: $SUBSTANTIAL_UI_TOKEN",
)
def ui(url: str | None, host: str, port: int, allow_actions: bool, token: str | None) -> None:
    """Serve a web page showing the store's runs, live (needs the [ui] extra)."""
    try:
        from substantial.ui.app import UIConfig, describe, serve
    except ModuleNotFoundError as exc:
        raise click.ClickException(
            f"the web UI needs the {exc.name} package: pip install 'substantial[ui]'"
        ) from exc
    try:
        config = UIConfig(common.backend_url(url), host, port, allow_actions, token)
    except SubstantialError as exc:
        raise click.UsageError(common.one_line(str(exc))) from exc
    click.echo(f"serving {describe(config)}", err=True)
    serve(config)
