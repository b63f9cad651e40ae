"""Process lookups shared by the tests that start and stop whole process sessions."""

from pathlib import Path


def session_pids(session_ids: set[int] | list[int]) -> list[int]:
    """Return the ids of the live (not zombie) processes whose session id is in ``session_ids``.

    Reads ``/proc/<pid>/stat`` (Linux): after the command name in brackets come the
    state, then the parent, process-group and session ids.
    """
    wanted = set(session_ids)
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) in wanted and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids
