"""Start and stop private ``redis-server`` processes for tests and benchmarks.

A server listens on 127.0.0.1 on a free port, keeps its files in a
directory of its own, and runs with AOF on, so a restart loses nothing that
was acknowledged. Used by tests/backend_redis.py and bench/bench_redis.py.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "RedisClusterServers",
    "RedisServer",
    "RedisServerMissing",
    "free_port",
    "redis_server_binary",
]

INSTALL_HINT = (
    "redis-server is not installed: run `scripts/setup --servers` "
    "(it runs `apt-get install redis-server`), or put a redis-server 6.2+ on PATH"
)


class RedisServerMissing(RuntimeError):
    """No ``redis-server`` executable on PATH."""


def redis_server_binary() -> str:
    """Return the path of ``redis-server``, or raise :class:`RedisServerMissing`."""
    path = shutil.which("redis-server")
    if path is None:
        raise RedisServerMissing(INSTALL_HINT)
    return path


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One private redis-server process, restartable on the same port and data."""

    def __init__(
        self,
        directory: Path,
        *,
        appendfsync: str = "everysec",
        password: str | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.directory = directory
        self.appendfsync = appendfsync
        self.password = password
        self.extra_args = list(extra_args)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Return a ``redis://`` URL of this server (with the password, if any)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 20.0) -> None:
        """Start the server (on its old port after a stop) and wait until it answers."""
        binary = redis_server_binary()
        self.directory.mkdir(parents=True, exist_ok=True)
        # A free port can be taken between probing and binding: try a few.
        for _attempt in range(5):
            port = self.port or free_port()
            args = [
                binary,
                "--bind", "127.0.0.1",
                "--port", str(port),
                "--dir", str(self.directory),
                "--appendonly", "yes",
                "--appendfsync", self.appendfsync,
                "--save", "",
                "--daemonize", "no",
                "--logfile", str(self.directory / "redis.log"),
                "--maxmemory-policy", "noeviction",
            ]  # fmt: skip
            if self.password:
                args += ["--requirepass", self.password]
            args += self.extra_args
            self.proc = subprocess.Popen(
                args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self._wait_ready(port, timeout):
                self.port = port
                return
            self._kill()
        log = self.directory / "redis.log"
        tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
        raise RuntimeError(f"redis-server did not start (see {log}): " + " | ".join(tail))

    def _wait_ready(self, port: int, timeout: float) -> bool:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if _answers_ping(port, self.password):
                return True
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 20.0) -> None:
        """Shut the server down cleanly (SIGTERM flushes the AOF); kill it if it hangs."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """Kill the server with SIGKILL, as a crash would."""
        self._kill()

    def _kill(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()

    def restart(self) -> None:
        """Stop the server and start it again on the same port and directory."""
        self.stop()
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RedisClusterServers:
    """A private Redis Cluster: ``nodes`` primaries, no replicas, slots split evenly."""

    SLOTS = 16384

    def __init__(self, directory: Path, nodes: int = 3) -> None:
        cluster_args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        self.servers = [
            RedisServer(directory / f"node{i}", extra_args=cluster_args) for i in range(nodes)
        ]

    @property
    def url(self) -> str:
        """Return a ``redis://`` URL of one node, with ``cluster=yes`` for RedisBackend."""
        return f"{self.servers[0].url}?cluster=yes"

    def start(self, timeout: float = 30.0) -> None:
        """Start every node, assign the slots, join the nodes and wait for ``cluster_state:ok``."""
        import redis

        for server in self.servers:
            server.start()
        step = -(-self.SLOTS // len(self.servers))
        for i, server in enumerate(self.servers):
            with redis.Redis(port=server.port) as r:
                high = min(self.SLOTS, (i + 1) * step) - 1
                r.execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, high)
                if i:
                    r.execute_command("CLUSTER", "MEET", "127.0.0.1", self.servers[0].port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(self._ready(server.port) for server in self.servers):
                return
            time.sleep(0.05)
        raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")

    def _ready(self, port: int) -> bool:
        import redis

        with redis.Redis(port=port) as r:
            info = r.cluster("info")
        return bool(
            info["cluster_state"] == "ok" and int(info["cluster_known_nodes"]) == len(self.servers)
        )

    def stop(self) -> None:
        """Stop every node."""
        for server in self.servers:
            server.stop()


def _answers_ping(port: int, password: str | None) -> bool:
    """Tell whether a server on ``port`` has finished loading and answers commands."""
    request = _command("PING")
    replies = 1
    if password:
        request = _command("AUTH", password) + request
        replies = 2
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(request)
            data = b""
            while data.count(b"\r\n") < replies:
                chunk = s.recv(256)
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    # -LOADING while the AOF is being replayed: not ready yet.
    return data.endswith(b"+PONG\r\n")


def _command(*parts: str) -> bytes:
    out = [f"*{len(parts)}\r\n".encode()]
    for part in parts:
        raw = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(raw), raw))
    return b"".join(out)
