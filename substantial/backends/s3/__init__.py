"""S3-compatible object storage: durable execution with nothing but a bucket.

Works on AWS S3 and on any server with S3's conditional writes (PutObject
with ``If-None-Match: *`` and ``If-Match: <etag>``): Cloudflare R2, MinIO,
SeaweedFS, GCS's S3 API. Workers coordinate through the bucket alone.

Layout under the key prefix ``p`` (see docs/PROTOCOL.md, "S3 layout")::

    p/runs/<run>/log/<position, 10 digits>   one entry; PUT If-None-Match: *
    p/runs/<run>/inbox/<event id>            one event; PUT If-None-Match: *
    p/runs/<run>/lease                       {"owner", "expires_at", "wid"}; If-Match CAS
    p/runs/<run>/due                         {"key", "at"}: names the run's live due key; CAS
    p/due/<µs, 17 digits>!<run>!<wid>        empty; the time-ordered due index
    p/meta/<run>                             RunInfo JSON; plain PUT

Rules that make it correct on a store with no transactions:

* Every conditional write carries a fresh write id (``wid``) in its metadata,
  and objects replaced by compare-and-swap carry one in their body too, so
  equal content never yields an equal ETag and a stale compare-and-swap
  cannot succeed after A→B→A.
* A lost race (412, 409 ``ConditionalRequestConflict``, 404 on If-Match) is a
  lost race: :class:`PositionTaken` or ``False``, never a retry that
  overwrites. Since HTTP clients resend a PUT whose reply was lost, a 412 is
  first checked against the stored write id: it may be our own write.
* Every PUT carries Content-MD5, so a body cut short never lands.
* The due index is one key per schedule call, named by time, so listing
  ``p/due/`` up to now finds due runs without touching any other run. A
  per-run pointer object names the live key; keys it does not name are
  leftovers of a crash or a concurrent reschedule and are skipped, then
  deleted once old.
* No object is rewritten by every worker: the hot path has no shared hot key.

Modules: ``_errors`` (driver errors), ``_objects`` (object I/O, retries,
conditional writes), ``_due`` (the due index and polling) and ``_backend``
(the backend itself).
"""

from __future__ import annotations

from substantial.backends.s3._backend import S3Backend

__all__ = ["S3Backend"]
