"""Lease owners: ids naming a host and process, and telling when such a process is gone."""

from __future__ import annotations

import os
import socket

__all__ = ["host_owner_is_dead", "make_owner"]

_HOST = socket.gethostname()


def _process_start_ticks(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    return fields[19].decode() if len(fields) > 19 else None


def make_owner(tag: str = "") -> str:
    """Return a lease-owner id naming this host and process uniquely.

    The process start time is part of it, so a recycled pid is never mistaken
    for the original owner.
    """
    pid = os.getpid()
    ticks = _process_start_ticks(pid) or "0"
    suffix = os.urandom(4).hex()
    return f"{_HOST}/{pid}/{ticks}/{tag}{suffix}"


def host_owner_is_dead(owner: str) -> bool:
    """Tell whether ``owner`` is a process on this host that no longer runs.

    Lets a new worker take over at once from a worker killed on the same
    machine, instead of waiting for its lease to expire. Owners on other
    hosts are never judged dead here: their leases expire by time.
    """
    parts = owner.split("/")
    if len(parts) != 4 or parts[0] != _HOST:
        return False
    try:
        pid = int(parts[1])
    except ValueError:
        return False
    ticks = _process_start_ticks(pid)
    return ticks is None or (parts[2] != "0" and ticks != parts[2])
