"""Start and stop private PostgreSQL servers for tests and benchmarks.

A server is a fresh cluster (``initdb``) in a temporary directory of its
own, listening on 127.0.0.1 on a free port, with password authentication
and the default durable settings (``fsync = on``, ``synchronous_commit =
on``). PostgreSQL refuses to run as root: when the tests run as root, the
cluster belongs to the ``postgres`` system user (created by the Debian
package) and its programs run under that user through ``runuser``.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

__all__ = [
    "PostgresServer",
    "PostgresServerMissing",
    "free_port",
    "postgres_bin_dir",
]

INSTALL_HINT = (
    "PostgreSQL is not installed: run `scripts/setup --servers` (it runs `apt-get install "
    "postgresql`), or set SUBSTANTIAL_PG_BIN to a directory holding initdb, pg_ctl and postgres"
)

#: The superuser and password of every test cluster.
USER = "substantial"
PASSWORD = "test-s3cr3t-pw"


class PostgresServerMissing(RuntimeError):
    """No PostgreSQL server binaries, or no unprivileged user to run them as."""


def postgres_bin_dir() -> Path:
    """Return the directory holding ``initdb``, ``pg_ctl`` and ``postgres`` (newest version).

    Debian keeps them in /usr/lib/postgresql/<version>/bin, off PATH.
    """
    env = os.environ.get("SUBSTANTIAL_PG_BIN")
    candidates = [env] if env else []
    versions = glob.glob("/usr/lib/postgresql/*/bin")
    versions.sort(key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0)
    candidates += reversed(versions)
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for directory in candidates:
        if all(os.access(Path(directory, b), os.X_OK) for b in ("initdb", "pg_ctl", "postgres")):
            return Path(directory)
    raise PostgresServerMissing(INSTALL_HINT)


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> list[str]:
    """Return the command prefix that runs a program as an unprivileged user."""
    if os.geteuid() != 0:
        return []
    try:
        pwd.getpwnam("postgres")
    except KeyError as exc:
        raise PostgresServerMissing(
            "the tests run as root and PostgreSQL refuses to: create a `postgres` system user "
            "(the Debian package `postgresql` does), or run the tests as another user"
        ) from exc
    runuser = shutil.which("runuser")
    if runuser is None:
        raise PostgresServerMissing("runuser (util-linux) is needed to start PostgreSQL as root")
    return [runuser, "-u", "postgres", "--"]


class PostgresServer:
    """One private PostgreSQL cluster, restartable on the same port and data."""

    def __init__(self, *, max_connections: int = 400) -> None:
        self.max_connections = max_connections
        self.port = 0
        self.root: Path | None = None
        self.running = False

    @property
    def data(self) -> Path:
        """Return the cluster's data directory."""
        assert self.root is not None, "the server was never started"
        return self.root / "data"

    def url(self, database: str = "postgres", *, password: str | None = PASSWORD) -> str:
        """Return a ``postgresql://`` URL of this server (with the password)."""
        auth = f"{USER}:{password}" if password is not None else USER
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{database}"

    def _cmd(self, binary: str, *args: str) -> list[str]:
        return [*_run_as(), str(postgres_bin_dir() / binary), *args]

    def _init(self) -> None:
        root = Path(tempfile.mkdtemp(prefix="substantial-pg-"))
        self.root = root
        pwfile = root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            entry = pwd.getpwnam("postgres")
            for path in (root, pwfile):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        subprocess.run(
            self._cmd(
                "initdb",
                "-D", str(self.data),
                "-U", USER,
                f"--pwfile={pwfile}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ),
            check=True,
            capture_output=True,
        )  # fmt: skip
        pwfile.unlink()

    def start(self, timeout: float = 30.0) -> None:
        """Create the cluster on first use, start it (on its old port after a stop), wait."""
        bin_dir = postgres_bin_dir()  # fail early with the install hint
        _run_as()
        if self.root is None:
            try:
                self._init()
            except subprocess.CalledProcessError as exc:
                raise RuntimeError(
                    f"initdb in {bin_dir} failed: {exc.stderr.decode(errors='replace')}"
                ) from exc
        # A free port can be taken between probing and binding: try a few.
        for _attempt in range(5):
            port = self.port or free_port()
            options = " ".join(
                [
                    "-c listen_addresses=127.0.0.1",
                    f"-c port={port}",
                    f"-c unix_socket_directories={self.root}",
                    f"-c max_connections={self.max_connections}",
                    "-c fsync=on",
                    "-c synchronous_commit=on",
                ]
            )
            proc = subprocess.run(
                self._cmd(
                    "pg_ctl", "start", "-w", "-t", str(int(timeout)),
                    "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options,
                ),
                capture_output=True,
            )  # fmt: skip
            if proc.returncode == 0 and self._answers(port):
                self.port = port
                self.running = True
                return
            self._pg_ctl_stop("immediate")
        log = self.root / "server.log"
        tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
        raise RuntimeError(f"postgres did not start (see {log}): " + " | ".join(tail))

    @staticmethod
    def _answers(port: int) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    def _pg_ctl_stop(self, mode: str) -> None:
        if self.root is None:
            return
        subprocess.run(
            self._cmd("pg_ctl", "stop", "-w", "-m", mode, "-D", str(self.data)),
            capture_output=True,
        )

    def stop(self) -> None:
        """Shut the server down cleanly (``-m fast``: sessions are ended, data is kept)."""
        self._pg_ctl_stop("fast")
        self.running = False

    def kill(self) -> None:
        """Stop the server as a crash would (``-m immediate``: no checkpoint)."""
        self._pg_ctl_stop("immediate")
        self.running = False

    def restart(self) -> None:
        """Stop the server and start it again on the same port and data."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stop the server and delete its directory."""
        self._pg_ctl_stop("immediate")
        self.running = False
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()
