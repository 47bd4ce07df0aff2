"""The web UI: a page served by the library that reads the same store the workers use.

Install the ``ui`` extra (``pip install 'substantial[ui]'``), then run
``substantial ui --backend URL``. The page is static HTML and JavaScript
shipped in this package; it talks to a small JSON API (:mod:`substantial.ui.app`).
Read-only and bound to 127.0.0.1 unless told otherwise; see docs/operate.md.
"""

from __future__ import annotations

from substantial.ui.app import UIConfig, create_app, serve

__all__ = ["UIConfig", "create_app", "serve"]
