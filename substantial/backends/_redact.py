"""Take secrets out of a backend URL before it goes into a message, a log or describe()."""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["redact_url"]

MASK = "***"

# Query parameter names whose values are credentials, matched case-insensitively
# anywhere in the (percent-decoded) name: password, aws_secret_access_key, token, ...
_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|credential|signature|auth", re.IGNORECASE)


def redact_url(url: str) -> str:
    """Return ``url`` with its password and secret-looking query values replaced by ``***``.

    Works on malformed URLs too (it never parses strictly, never raises): the
    userinfo runs from ``//`` to the *last* ``@``, so a password holding an
    unencoded ``/``, ``?``, ``#`` or ``@`` is still masked whole. The price is
    that a URL with an ``@`` in its query and a port may be masked more than
    needed, which is the safe side for an error message.
    """
    if not isinstance(url, str):
        return MASK
    start = url.find("//")
    if start >= 0:
        at = url.rfind("@")
        if at > start:
            userinfo = url[start + 2 : at]
            user, colon, _ = userinfo.partition(":")
            if colon:
                url = f"{url[: start + 2]}{user}:{MASK}{url[at:]}"
    query_at = url.find("?")
    if query_at < 0:
        return url
    fragment_at = url.find("#", query_at)
    end = len(url) if fragment_at < 0 else fragment_at
    pairs = re.split(r"([&;])", url[query_at + 1 : end])
    for i in range(0, len(pairs), 2):
        name, eq, _ = pairs[i].partition("=")
        if eq and _SECRET_NAME.search(unquote(name)):
            pairs[i] = f"{name}={MASK}"
    return f"{url[: query_at + 1]}{''.join(pairs)}{url[end:]}"
