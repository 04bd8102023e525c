"""`qcownbd status`, `snapshot` and `upgrade`: ask a running server on its control socket.

    qcownbd status [--control PATH] [--json]
    qcownbd snapshot [--control PATH] [--name FILE] [--json] EXPORT
    qcownbd upgrade [--control PATH] [--json]

The server listens there only when told (`serve --control PATH`, or
``control_socket`` in its config); the systemd unit's is the default.
"""

import json

from qcownbd.console import human_size, setup_logging
from qcownbd.control import DEFAULT_PATH, ask


def register(sub, common) -> None:
    """Add `status` and `snapshot` to the `qcownbd` parser."""
    p = sub.add_parser("status", parents=[common],
                       help="show a running server's exports and clients")
    _common_options(p)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("snapshot", parents=[common],
                       help="live snapshot of a served QCOW1 export: its clients pause, "
                            "the image's state is kept, writes go on into a new overlay")
    _common_options(p)
    p.add_argument("--name", metavar="FILE",
                   help="the snapshot's file name, beside the image "
                        "(default: IMAGE-STEM.snap-UTCTIME.EXT)")
    p.add_argument("export", metavar="EXPORT")
    p.set_defaults(func=cmd_snapshot)
    p = sub.add_parser("upgrade", parents=[common],
                       help="hand a running server's sockets and clients over to a new "
                            "server process (the qcownbd installed now); clients only pause")
    _common_options(p)
    p.set_defaults(func=cmd_upgrade)


def _common_options(p) -> None:
    p.add_argument("--control", metavar="PATH", default=DEFAULT_PATH,
                   help=f"the server's control socket (default {DEFAULT_PATH})")
    p.add_argument("--json", action="store_true", help="JSON output")


def cmd_status(args) -> int:
    """`qcownbd status`."""
    setup_logging(args)
    status = ask(args.control, {"command": "status"})
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_snapshot(args) -> int:
    """`qcownbd snapshot`."""
    setup_logging(args)
    request = {"command": "snapshot", "export": args.export}
    if args.name:
        request["name"] = args.name
    done = ask(args.control, request)
    if args.json:
        print(json.dumps(done, indent=2))
    else:
        print(f"export {done['export']}: snapshot {done['snapshot']} taken; "
              f"{done['image']} is a new overlay of it "
              f"(clients paused {1000 * done['paused_seconds']:.0f} ms)")
    return 0


def cmd_upgrade(args) -> int:
    """`qcownbd upgrade`: returns once the successor serves."""
    setup_logging(args)
    done = ask(args.control, {"command": "upgrade"}, timeout=600.0)
    if args.json:
        print(json.dumps(done, indent=2))
    else:
        print(f"upgraded: pid {done['pid']} serves now (was pid {done['previous_pid']})")
    return 0


def format_status(status: dict) -> str:
    """What a person reads of `status`'s answer."""
    lines = [f"qcownbd {status['version']}, pid {status['pid']}, up "
             f"{_duration(status['uptime_seconds'])}, listening on "
             f"{', '.join(status['listening']) or 'nothing'}", ""]
    lines += _table(["EXPORT", "IMAGE", "FORMAT", "SIZE", "MODE", "CLIENTS"],
                    [[e["name"], e["image"] or "-", e["format"], human_size(e["size"]),
                      "ro" if e["read_only"] else "rw", str(e["clients"])]
                     for e in status["exports"]])
    for broken in status["unavailable"]:
        lines.append(f"unavailable: {broken['name']}: {broken['reason']}")
    lines += ["", _cache_line(status["metadata_cache"]), ""]
    if status["clients"]:
        lines += _table(["CLIENT", "EXPORT", "FOR", "REQUESTS", "READ", "WRITTEN", "ERRORS"],
                        [[c["client"], c["export"] or f"({c['phase']})",
                          _duration(c["seconds"]), str(c["requests"]),
                          human_size(c["bytes_read"]), human_size(c["bytes_written"]),
                          str(c["errors"])] for c in status["clients"]])
    else:
        lines.append("no clients connected")
    if status.get("workers"):
        lines.append("")
        lines += _table(["WORKER", "PID", "CONNECTIONS", "METADATA CACHE", "EXPORTS"],
                        [[str(w["index"]), str(w["pid"]), str(w["connections"]),
                          f"{human_size(w['metadata_cache']['used'])} of "
                          f"{human_size(w['metadata_cache']['budget'])}",
                          ", ".join(w["exports"]) or "-"] for w in status["workers"]])
    ended = status["ended"]
    lines.append(f"ended: {ended['clients']} client(s), {ended['requests']} request(s), "
                 f"{human_size(ended['bytes_read'])} read, "
                 f"{human_size(ended['bytes_written'])} written, {ended['errors']} error(s)")
    return "\n".join(lines)


def _cache_line(cache: dict) -> str:
    """"metadata cache: 1.5 MiB of 32 MiB (48 L2 tables of 3 images), 97% hits"."""
    lookups = cache["hits"] + cache["misses"]
    hits = f", {100 * cache['hits'] // lookups}% hits" if lookups else ""
    return (f"metadata cache: {human_size(cache['used'])} of {human_size(cache['budget'])} "
            f"({cache['tables']} L2 tables of {cache['images']} images){hits}, "
            f"{cache['evictions']} evicted")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    return ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
            for row in [header, *rows]]


def _duration(seconds: float) -> str:
    """"4s", "5m02s", "2h03m", "3d04h"."""
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"
