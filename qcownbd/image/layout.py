"""What each format reports to `info` and `map`, with qemu-img's keys and conventions.

A map entry is a dict with qemu-img's JSON keys (start, length, depth,
present, zero, data, and offset where the bytes sit at a known place in a
file) plus ``file``, the image holding them.  QEMU's conventions, observed
with qemu-img 7.2: a raw file is "present" everywhere (its holes are
zero, non-data runs with an offset), a run no image stores is not present
and has the depth of the deepest image looked at, and a run past the end of
a shorter backing file is not present at depth 0.  The walk down a backing
chain is format-blind and lives with the format table (`formats.chain_map`).
"""


def map_entry(start: int, length: int, depth: int, present: bool, zero: bool, data: bool,
              path: str) -> dict:
    """One entry of `qemu-img map --output=json`, plus the file holding it."""
    return {"start": start, "length": length, "depth": depth, "present": present,
            "zero": zero, "data": data, "file": path}


def raw_facts(img) -> dict:
    """`info` keys of a raw image: the bytes its file really stores."""
    return {"allocated-bytes": sum(e.length for e in _extents(img, 0, img.size) if not e.hole)}


def raw_map(img, start: int, length: int, depth: int):
    """Map entries of a raw image: present everywhere, each byte at its own offset."""
    pos = start
    for extent in _extents(img, start, length):
        entry = map_entry(pos, extent.length, depth, True, extent.zero, not extent.hole,
                          img.path)
        entry["offset"] = pos
        yield entry
        pos += extent.length


def _extents(img, start: int, length: int):
    """Every block_status extent of [start, start+length) (one call may stop early)."""
    pos, end = start, start + length
    while pos < end:
        for extent in img.block_status(pos, end - pos):
            yield extent
            pos += extent.length


def qcow1_facts(img) -> dict:
    """`info` keys of a QCOW1 image: its own clusters, and the backing file it names."""
    info = {"cluster-size": img.cluster_size, "allocated-bytes": img.allocated_bytes()}
    if img.backing is not None:
        info["backing-filename"] = img.backing_name
        info["full-backing-filename"] = img.backing.path
        info["backing-format"] = img.backing.format_name
    return info


def qcow1_map(img, start: int, length: int, depth: int):
    """Map entries of a QCOW1 image's own clusters; runs it does not store are
    yielded not present, for the chain walk to look below."""
    for run_start, run_length, kind, host_offset, level in img.map_extents(start, length):
        stored = level == 1
        entry = map_entry(run_start, run_length, depth, stored, not stored, stored, img.path)
        if stored and kind == "data" and host_offset is not None:
            entry["offset"] = host_offset
        yield entry


def merge_map(entries) -> list[dict]:
    """Join neighbours in the same state and file whose offsets (if any) continue."""
    merged: list[dict] = []
    for entry in entries:
        last = merged[-1] if merged else None
        if last is not None and _continues(last, entry):
            last["length"] += entry["length"]
        else:
            merged.append(dict(entry))
    return merged


def _continues(last: dict, entry: dict) -> bool:
    same = all(last[k] == entry[k] for k in ("depth", "present", "zero", "data", "file"))
    if not same or ("offset" in last) != ("offset" in entry):
        return False
    return "offset" not in last or last["offset"] + last["length"] == entry["offset"]
