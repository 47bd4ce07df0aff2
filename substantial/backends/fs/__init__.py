"""A backend in a local directory, shared safely by many processes of one machine.

Layout (docs/PROTOCOL.md, "fs backend", is normative)::

    <root>/runs/<run_id>/log.seg            the run's log: checksummed records, appended
    <root>/runs/<run_id>/inbox/<event_id>   arrival time in ns, a newline, event data
    <root>/runs/<run_id>/meta.json          run metadata, replaced atomically
    <root>/runs/<run_id>/lock               the lease, rewritten in place under its flock()
    <root>/runs/<run_id>/due                symlink to the run's current due key
    <root>/due/<hour>/<at µs>-<run_id>      the due index, one empty file per run
    <root>/wake/<pid>-<random>              unix datagram sockets of waiting clients

A log entry is appended to the run's segment under an exclusive ``flock()``
on it, only at the first free position: the lock is the fencing. Readers
stop before a record that is not whole (a torn tail left by a writer killed
mid-append), and the next appender cuts it off. Logs of layout 1 (one file
per entry, ``log/000000000042``) are read and extended as they are.

Events are published with ``link()``, which fails if the name is taken:
create-if-absent, and since the file is complete before it gets its name,
no reader ever sees half an event.

Modules: ``_segment`` (the log), ``_files`` (publishing, atomic replace,
locks, OS errors), ``_due`` (the due index) and ``_backend`` (the backend
itself).
"""

from __future__ import annotations

from substantial.backends.fs._backend import FSBackend

__all__ = ["FSBackend"]
