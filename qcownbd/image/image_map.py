"""The allocation map of a whole backing chain, as `qemu-img map` reports it.

Each entry is a dict with qemu-img's JSON keys (start, length, depth,
present, zero, data, and offset where the bytes sit at a known place in a
file) plus ``file``, the image holding them.  QEMU's conventions, observed
with qemu-img 7.2: a raw file is "present" everywhere (its holes are
zero, non-data runs with an offset), a run no image stores is not present
and has the depth of the deepest image looked at, and a run past the end of
a shorter backing file is not present at depth 0.
"""


def chain_map(img, start: int, length: int, depth: int):
    """Yield map entries covering [start, start+length) of ``img`` (at ``depth``)."""
    if img.format_name == "raw":
        yield from _raw_map(img, start, length, depth)
        return
    for run_start, run_length, kind, host_offset, level in img.map_extents(start, length):
        if level != 1:
            # not stored in this image: walk the chain ourselves, one file at a time
            yield from _below(img, run_start, run_length, depth)
            continue
        entry = _entry(run_start, run_length, depth, True, False, True, img.path)
        if kind == "data" and host_offset is not None:
            entry["offset"] = host_offset
        yield entry


def _below(img, start: int, length: int, depth: int):
    """Entries for a run ``img`` does not store: its backing file's, or nothing."""
    backing = img.backing
    if backing is None:
        yield _entry(start, length, depth, False, True, False, img.path)
        return
    inside = max(0, min(length, backing.size - start))
    if inside:
        yield from chain_map(backing, start, inside, depth + 1)
    if inside < length:
        yield _entry(start + inside, length - inside, 0, False, True, False, img.path)


def _raw_map(img, start: int, length: int, depth: int):
    pos, end = start, start + length
    while pos < end:
        for extent in img.block_status(pos, end - pos):
            entry = _entry(pos, extent.length, depth, True, extent.zero, not extent.hole,
                           img.path)
            entry["offset"] = pos
            yield entry
            pos += extent.length


def _entry(start, length, depth, present, zero, data, path) -> dict:
    return {"start": start, "length": length, "depth": depth, "present": present,
            "zero": zero, "data": data, "file": path}


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
