"""Cross-process wake-ups for backends on one machine, over unix datagram sockets.

Every backend instance that waits for work binds one datagram socket in a
wake directory beside the store. Whoever makes work due sends one byte to
every socket there; the receiver turns it into ``Waker.notify()``. A socket
whose process died refuses the datagram and is unlinked by the sender, so
the directory cleans itself.

Datagrams are best effort (a full receive queue drops them), which is fine:
a waiter with a datagram queued is already going to wake, and workers fall
back to polling with a timeout anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import socket
import tempfile
import weakref

from substantial.backends.base import Waker

__all__ = ["WakeChannel", "wake_dir_for"]

# sun_path holds 108 bytes including the terminating NUL.
_SUN_PATH_MAX = 107
# "<pid>-<8 hex>": pids reach 4194304 (7 digits) on Linux.
_NAME_MAX = 16
_DEAD_ERRNOS = frozenset({errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK})


def wake_dir_for(preferred: str) -> str:
    """Return the wake directory to use for a store whose natural one is ``preferred``.

    A path too long for a socket address is replaced by a directory under
    the system temp dir named by a hash of the resolved path, so every
    process that opens the same store computes the same fallback.
    """
    preferred = os.path.abspath(preferred)
    if len(os.fsencode(preferred)) + 1 + _NAME_MAX <= _SUN_PATH_MAX:
        return preferred
    digest = hashlib.sha256(os.fsencode(os.path.realpath(preferred))).hexdigest()[:24]
    return os.path.join(tempfile.gettempdir(), f"substantial-wake-{digest}")


class WakeChannel:
    """Send and receive "work is due" signals among the processes sharing one store."""

    def __init__(self, directory: str, waker: Waker) -> None:
        self.directory = wake_dir_for(directory)
        self._waker = waker
        self._sockets = _Sockets()
        # A backend dropped without close() must not leave its socket open or its file behind.
        self._finalizer = weakref.finalize(self, self._sockets.close)
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- sending ----------------------------------------------------------

    def broadcast(self) -> None:
        """Wake every waiter of this store, in this process and in others."""
        self._waker.notify()
        if not self._finalizer.alive:
            return  # closed: no sockets any more
        try:
            names = os.listdir(self.directory)
        except OSError:
            return  # nobody has ever waited on this store
        sockets = self._sockets
        if sockets.sender is None:
            sockets.sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sockets.sender.setblocking(False)
        own = os.path.basename(sockets.path) if sockets.path else None
        for name in names:
            if name == own or name.startswith("."):
                continue
            path = os.path.join(self.directory, name)
            try:
                sockets.sender.sendto(b"\x01", path)
            except BlockingIOError:
                pass  # its queue is full: that waiter has a wake-up pending already
            except OSError as exc:
                if exc.errno in _DEAD_ERRNOS:
                    # Nobody is bound there any more: its process died without cleaning up.
                    with contextlib.suppress(OSError):
                        os.unlink(path)

    # -- receiving --------------------------------------------------------

    async def wait(self, timeout: float) -> bool:
        """Sleep until another process (or this one) makes work due, or ``timeout`` passes."""
        self.listen()
        # The waker keeps a signal that arrived while nobody waited, so it counts at once.
        return await self._waker.wait(timeout)

    def listen(self) -> None:
        """Bind this instance's socket (once) and watch it from the running event loop."""
        loop = asyncio.get_running_loop()
        if self._loop is loop or not self._finalizer.alive:
            return  # listening already, or closed
        if self._sockets.receiver is None:
            self._bind()
        if self._sockets.receiver is None:
            return  # no socket possible: waiters fall back to their timeout
        self._detach()
        loop.add_reader(self._sockets.receiver.fileno(), self._on_readable)
        self._loop = loop

    def _bind(self) -> None:
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError:
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.setblocking(False)
        for _ in range(8):
            path = os.path.join(self.directory, f"{os.getpid()}-{os.urandom(4).hex()}")
            try:
                sock.bind(path)
            except FileExistsError:
                continue  # a dead process with a recycled pid left the same name
            except OSError:
                break
            self._sockets.receiver = sock
            self._sockets.path = path
            return
        sock.close()

    def _on_readable(self) -> None:
        receiver = self._sockets.receiver
        if receiver is None:
            return
        # Drain everything queued: one notify covers any number of signals.
        while True:
            try:
                receiver.recv(64)
            except OSError:  # BlockingIOError once the queue is empty
                break
        self._waker.notify()

    def _detach(self) -> None:
        loop, self._loop = self._loop, None
        receiver = self._sockets.receiver
        if loop is not None and receiver is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError, ValueError):
                loop.remove_reader(receiver.fileno())

    def close(self) -> None:
        """Stop listening, remove this instance's socket file and close both sockets."""
        self._detach()
        self._finalizer()


class _Sockets:
    """The channel's sockets, apart from it so that a finalizer can close them."""

    def __init__(self) -> None:
        self.sender: socket.socket | None = None
        self.receiver: socket.socket | None = None
        self.path: str | None = None

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None
        if self.path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            self.path = None
        if self.sender is not None:
            self.sender.close()
            self.sender = None
