"""A Redis backend: one Redis (or Redis Cluster) shared by every worker.

Every key of one run carries the hash tag ``{<prefix>:<run id>}``, so all of
a run's keys live in one hash slot and each per-run operation is one atomic
Lua script, also on a cluster. The cross-run indexes (due times, run ids)
are sharded into :data:`SHARDS` sorted sets, each with its own hash tag, so
no single key takes every write. Waiting workers are woken through pub/sub,
with polling as the fallback. docs/PROTOCOL.md (the Redis section) describes
the key layout precisely.

Redis must not evict keys: run it with ``maxmemory-policy noeviction`` (the
default). Durability is Redis's: turn AOF on; ``appendfsync always`` keeps
every acknowledged write through any crash, ``everysec`` may lose the last
second or two of them if the server or its machine crashes.

Modules: ``_scripts`` (Lua), ``_errors`` (driver errors, outages),
``_listen`` (pub/sub wake-ups) and ``_backend`` (the backend itself).
"""

from __future__ import annotations

from substantial.backends.redis._backend import SHARDS, RedisBackend, shard_of

__all__ = ["SHARDS", "RedisBackend", "shard_of"]
