"""Sharing out due runs among workers without talking to each other.

Every worker polls the same due index. Left alone, each would try to lease
every new run, and all but one of those lease writes would lose: on SQLite
each is a turn at the single write lock, on S3 a conditional PUT that
SeaweedFS serialises behind the winner. A worker learns who else works on
the store from the leases it loses to (and reads), and then goes first only
for the runs it wins by rendezvous hashing among itself and those peers; it
looks at the others after a short pause, reading their lease (a read, not a
write) before trying to take one. A peer that died stops being seen within
:data:`WINDOW`; until then its runs wait :data:`DEFER` longer.
"""

from __future__ import annotations

import hashlib

__all__ = ["DEFER", "WINDOW", "Peers", "claim_order"]

#: How long a run another worker goes first for is left to it.
DEFER = 0.05
#: How long a worker seen holding a run counts as a peer.
WINDOW = 60.0

Candidate = tuple[str, float]


def _score(owner: str, run_id: str) -> bytes:
    # A keyed hash: crc32 salted with the owner ranks runs alike for every owner.
    return hashlib.blake2b(run_id.encode(), digest_size=8, key=owner.encode()[:64]).digest()


def claim_order(owner: str, candidates: list[Candidate], room: int) -> list[Candidate]:
    """Choose which of the due ``candidates`` (in due order) a worker with ``room`` tries.

    With room for them all it tries them all. Otherwise workers that all saw the same
    due list must not all race for the same first runs: each ranks runs due in the same
    second by a hash of its own name and the run's, so they spread over the list, while
    a run due in an earlier second still goes first (no run waits behind newer ones).
    """
    if len(candidates) <= room:
        return candidates
    if room <= 0:
        return []
    return sorted(candidates, key=lambda c: (int(c[1]), _score(owner, c[0])))[:room]


class Peers:
    """The other workers seen holding runs lately, and the runs left to them for now."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        #: Each peer, and when it was last seen holding a run.
        self.seen: dict[str, float] = {}
        #: Runs left to a peer, and when this worker looks at them.
        self.deferred: dict[str, float] = {}

    def saw(self, holder: str, now: float) -> None:
        """Note ``holder`` holding a run, if it is another worker.

        Workers name themselves ``host/pid/ticks/w<hex>`` (``make_owner("w")``); a
        resume, delete or prune holding a run for a moment is no peer to share with,
        nor is an unreadable lease's owner ``?``.
        """
        if holder != self.owner and holder.rpartition("/")[2].startswith("w"):
            self.seen[holder] = now

    def split(self, wanted: list[Candidate], now: float) -> tuple[list[Candidate], list[Candidate]]:
        """Return the runs to try at once, and the deferred ones to look at (lease first)."""
        peers = [o for o, at in self.seen.items() if at > now - WINDOW]
        if not peers:
            return wanted, []
        mine: list[Candidate] = []
        look: list[Candidate] = []
        for candidate in wanted:
            run_id = candidate[0]
            own = _score(self.owner, run_id)
            if all(own > _score(peer, run_id) for peer in peers):
                mine.append(candidate)
            elif self.deferred.setdefault(run_id, now + DEFER) <= now:
                look.append(candidate)
        return mine, look

    def taken(self, run_id: str) -> None:
        """Forget a run's deferral: someone holds it now."""
        self.deferred.pop(run_id, None)

    def next_at(self, now: float) -> float | None:
        """When the earliest deferred run is to be looked at, if one is still waiting."""
        later = [t for t in self.deferred.values() if t > now]
        return min(later, default=None)

    def forget(self, now: float) -> None:
        """Drop peers not seen within the window, and deferrals long past."""
        self.seen = {o: at for o, at in self.seen.items() if at > now - WINDOW}
        self.deferred = {r: at for r, at in self.deferred.items() if at > now - WINDOW}
