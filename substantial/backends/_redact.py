"""Take secrets out of a backend URL before it goes into a message, a log or describe()."""

from __future__ import annotations

import re
from urllib.parse import unquote

__all__ = ["redact_text", "redact_url"]

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
    user, password, rest = _split_userinfo(url)
    if password is not None:
        url = f"{user}:{MASK}{rest}"
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


def redact_text(text: str, url: str) -> str:
    """Mask in ``text`` (a driver's error message about ``url``) every piece of its secrets.

    Drivers quote parts of a URL they cannot parse, e.g. the part of a
    password before an unencoded ``/`` taken for a port.
    """
    secrets: list[str] = []
    _, password, _ = _split_userinfo(url)
    if password is not None:
        secrets.append(password)
    query_at = url.find("?")
    if query_at >= 0:
        for pair in re.split(r"[&;#]", url[query_at + 1 :]):
            name, eq, value = pair.partition("=")
            if eq and _SECRET_NAME.search(unquote(name)):
                secrets.append(value)
    pieces = {p for s in secrets for v in (s, unquote(s)) for p in [v, *re.split(r"[/?#@:&;=]", v)]}
    # Longest first, so a whole secret is masked before any piece of it.
    for piece in sorted((p for p in pieces if len(p) >= 2), key=len, reverse=True):
        text = text.replace(piece, MASK)
    return text


def _split_userinfo(url: str) -> tuple[str, str | None, str]:
    """Split into (everything up to the user name, the password or None, "@" and the rest)."""
    start = url.find("//")
    begin = start + 2 if start >= 0 else 0
    at = url.rfind("@")
    if at < begin:
        return url, None, ""
    user, colon, password = url[begin:at].partition(":")
    if not colon:
        return url, None, ""
    return url[:begin] + user, password, url[at:]
