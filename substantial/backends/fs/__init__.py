"""A backend in a local directory, shared safely by many processes of one machine.

Layout (docs/PROTOCOL.md, "fs backend", is normative)::

    <root>/runs/<run_id>/log/000000000042   one immutable file per log entry
    <root>/runs/<run_id>/inbox/<event_id>   arrival time in ns, a newline, event data
    <root>/runs/<run_id>/meta.json          run metadata, replaced atomically
    <root>/runs/<run_id>/lease              {"owner", "expires_at"}, replaced atomically
    <root>/runs/<run_id>/lock               flock()ed around lease and schedule updates
    <root>/runs/<run_id>/due                symlink to the run's current due key
    <root>/due/<hour>/<at µs>-<run_id>      the due index, one empty file per run
    <root>/wake/<pid>-<random>              unix datagram sockets of waiting clients

Entries and events are published with ``link()``, which fails if the name is
taken: that is the create-if-absent fencing, and since the file is complete
before it gets its name, no reader ever sees half an entry.

Modules: ``_files`` (publishing, atomic replace, locks, OS errors), ``_due``
(the due index) and ``_backend`` (the backend itself).
"""

from __future__ import annotations

from substantial.backends.fs._backend import FSBackend

__all__ = ["FSBackend"]
