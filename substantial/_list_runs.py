"""What ``Conductor.list`` answers: runs in id order or newest first, or one run's children."""

from __future__ import annotations

from substantial.backends._recent import check_before, sort_key
from substantial.backends.base import Backend, RunInfo, validate_id
from substantial.errors import InvalidArgument
from substantial.records import decode_entry

__all__ = ["list_runs"]


async def list_runs(
    backend: Backend,
    *,
    status: str | None,
    workflow: str | None,
    parent: str | None,
    limit: int,
    newest_first: bool,
    before: tuple[float, str] | None,
) -> list[RunInfo]:
    """Return runs' metadata as ``Conductor.list`` documents it."""
    if before is not None and not newest_first:
        raise InvalidArgument(
            "before= is the cursor of a newest-first listing: pass newest_first=True too"
        )
    if parent is None:
        if newest_first:
            return await backend.list_recent(
                status=status, workflow=workflow, limit=limit, before=before
            )
        return await backend.list_runs(status=status, workflow=workflow, limit=limit)
    # The parent's log names every child it started: read that, not the whole store.
    ids: dict[str, None] = {}
    for position, data in enumerate(await backend.read_log(validate_id("run id", parent))):
        for record in decode_entry(parent, position, data):
            if record["k"] == "child" and "error" not in record:
                ids[record["run_id"]] = None
    out: list[RunInfo] = []
    for run_id in sorted(ids):
        info = await backend.get_run(run_id)
        if info is not None and status in (None, info.status) and workflow in (None, info.workflow):
            out.append(info)
    if newest_first:
        cursor = check_before(before)
        out = [info for info in out if cursor is None or sort_key(info) < cursor]
        out.sort(key=sort_key, reverse=True)
    return out[:limit]
