"""The one place the s3 backend's driver errors become Substantial's."""

from __future__ import annotations

from typing import Any

try:
    import aiohttp
    from botocore.exceptions import ClientError, IncompleteReadError
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import HTTPClientError as BotoHTTPClientError
except ImportError as _exc:  # pragma: no cover - depends on the installed extras
    raise ImportError("the s3 backend needs aiobotocore: pip install 'substantial[s3]'") from _exc

from substantial.errors import BackendError

__all__ = ["TRANSIENT_ERRORS", "Rejected", "client_error"]

_CONFLICT_STATUSES = frozenset({404, 409, 412})
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "InternalError",
        # The body was damaged or cut short on the way: nothing was stored.
        "BadDigest",
        "IncompleteBody",
        "XAmzContentSHA256Mismatch",
        "ServiceUnavailable",
        "BadGateway",
        "GatewayTimeout",
    }
)
_AUTH_CODES = frozenset(
    {
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
        "403",
    }
)
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    BotoConnectionError,
    BotoHTTPClientError,
    IncompleteReadError,
    # A response body cut short surfaces from aiohttp itself, not wrapped by botocore.
    aiohttp.ClientError,
    TimeoutError,
    OSError,
)


class Rejected(Exception):
    """A request the server refused on purpose: a precondition or a missing key."""

    def __init__(self, status: int, code: str) -> None:
        super().__init__(f"{status} {code}")
        self.status = status
        self.code = code


def client_error(
    exc: ClientError, op: str, where: str, bucket: str, endpoint: str | None
) -> Exception | None:
    """Return the error to raise for a refused request, or None if it is worth retrying.

    404/409/412 become :class:`Rejected`: the caller decides what a missing
    key or a failed precondition means.
    """
    error: dict[str, Any] = dict(exc.response.get("Error", {}))
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    if code == "NoSuchBucket":
        return BackendError(
            f"bucket {bucket!r} does not exist{' at ' + endpoint if endpoint else ''}: "
            "create it, or fix the bucket name in the URL"
        )
    if status in _CONFLICT_STATUSES:
        return Rejected(status, code)
    if code == "RequestTimeTooSkewed":
        return BackendError(
            f"{op} on {where} was refused: this machine's clock is off by more than "
            "15 minutes from the server's; fix the clock (NTP)"
        )
    if status == 403 or code in _AUTH_CODES:
        return BackendError(
            f"{op} on {where} was denied ({code or status}): check the credentials "
            "(AWS_ACCESS_KEY_ID, AWS_PROFILE, ...) and the bucket policy"
        )
    if status == 501 or code == "NotImplemented":
        return BackendError(
            f"the server at {endpoint or 'AWS'} does not implement {op} as "
            f"used here ({error.get('Message', code)}); substantial needs conditional "
            "writes (PutObject with If-None-Match and If-Match)"
        )
    if status >= 500 or status in (408, 429) or code in _TRANSIENT_CODES:
        return None
    return BackendError(f"{op} on {where} failed: {code or status}: {error.get('Message', '')}")
