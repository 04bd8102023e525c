"""`qcownbd fleet`: list, inspect, delete and commit the overlays of fleet exports.

    qcownbd fleet list   SOURCE [--json]
    qcownbd fleet info   SOURCE OVERLAY [--json]
    qcownbd fleet delete SOURCE OVERLAY...
    qcownbd fleet commit SOURCE OVERLAY NEW_GOLDEN [-O raw|qcow1]

SOURCE is the server's TOML config (its fleet exports are the tables with
a `golden` key) or one overlay directory.  OVERLAY is an overlay's ID, or
EXPORT/ID as clients name it (needed when the config has several fleets).
Overlays a client is using are locked by the server: delete and commit
refuse them, list and info show them as in use.  A fleet, an overlay or a
file that is not there exits 1, like any failure; 2 is for a command line
that is malformed in itself.
"""

import argparse
import json
import os
import sys
from dataclasses import dataclass

from qcownbd.config import OVERLAY_MODES, FleetConfig, load_config
from qcownbd.console import Progress, human_size, setup_logging
from qcownbd.errors import ConfigError, ImageFormatError, UsageError
from qcownbd.fleet import (
    OverlayDir, describe_overlay, is_overlay_id, remove_unless_in_use,
)
from qcownbd.image import formats
from qcownbd.image.convert import convert_to_new
from qcownbd.image.formats import normalise_format
from qcownbd.image.probe import open_image

SOURCE_HELP = "the server's TOML config, or an overlay directory"
OVERLAY_HELP = "ID, or EXPORT/ID as clients name it"


@dataclass
class FleetFiles:
    """One fleet as the commands see it (a bare overlay directory has no name, no format pin)."""

    name: str | None
    dir: OverlayDir
    golden_format: str | None = None

    def label(self, ident: str) -> str:
        """How clients name overlay ``ident``."""
        return f"{self.name}/{ident}" if self.name else ident


def register(sub, common) -> None:
    """Add `fleet` and its actions to the `qcownbd` parser."""
    fleet = sub.add_parser("fleet", help="list, inspect, delete and commit fleet overlays",
                           description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    fleet.set_defaults(func=_no_action)
    actions = fleet.add_subparsers(dest="fleet_action", metavar="ACTION",
                                   parser_class=type(fleet))
    p = actions.add_parser("list", parents=[common], help="list the overlays")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_list)
    p = actions.add_parser("info", parents=[common], help="show one overlay and its chain")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("overlay", metavar="OVERLAY", help=OVERLAY_HELP)
    p.add_argument("--json", action="store_true", help="JSON output")
    p.set_defaults(func=cmd_info)
    p = actions.add_parser("delete", parents=[common],
                           help="delete overlays no client is using")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("overlays", metavar="OVERLAY", nargs="+", help=OVERLAY_HELP)
    p.set_defaults(func=cmd_delete)
    p = actions.add_parser(
        "commit", parents=[common],
        help="write golden+overlay, flattened, into a NEW golden image",
        description="Write what OVERLAY's client sees (golden image plus overlay) into the new "
                    "file NEW_GOLDEN. Neither the golden image nor the overlay changes; point "
                    "the fleet's golden at NEW_GOLDEN to roll it out (overlays of the old "
                    "golden image are then refused: delete them).")
    p.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)
    p.add_argument("overlay", metavar="OVERLAY", help=OVERLAY_HELP)
    p.add_argument("new_golden", metavar="NEW_GOLDEN", help="the image to create")
    p.add_argument("-O", "--output-format", choices=formats.choices(),
                   help="format of NEW_GOLDEN (default: the golden image's)")
    p.set_defaults(func=cmd_commit)


def _no_action(args) -> int:
    raise UsageError("fleet: give an action: list, info, delete or commit (see --help)")


# -- finding fleets and overlays ---------------------------------------------------

def fleets_of(source: str) -> list[FleetFiles]:
    """The fleets of a config file, or the one fleet an overlay directory holds."""
    if os.path.isdir(source):
        return [FleetFiles(None, OverlayDir(source))]
    if not os.path.exists(source):
        raise ConfigError(f"fleet: {source}: no such config file or overlay directory")
    fleets = [FleetFiles(c.name, OverlayDir(c.overlay_dir), c.golden_format)
              for c in load_config(source).exports.values() if isinstance(c, FleetConfig)]
    if not fleets:
        raise ConfigError(f"fleet: {source} has no fleet export (a table with a golden key)")
    return fleets


def find_overlay(source: str, overlay: str) -> tuple[FleetFiles, str, str]:
    """(fleet, ID, path) of the overlay named OVERLAY; ImageFormatError if there is none
    (ConfigError when SOURCE has no such fleet, UsageError for a malformed name)."""
    export, slash, ident = overlay.rpartition("/")
    if not is_overlay_id(ident):
        raise UsageError(f"fleet: bad overlay name {overlay!r}")
    fleets = fleets_of(source)
    if slash:
        fleets = [f for f in fleets if f.name == export]
        if not fleets:
            raise ConfigError(f"fleet: {source} has no fleet named {export!r}")
    elif len(fleets) > 1:
        names = ", ".join(f.name for f in fleets)
        raise ConfigError(f"fleet: {source} has several fleets ({names}): write EXPORT/ID")
    fleet = fleets[0]
    for ephemeral in (False, True):
        path = fleet.dir.path(ident, ephemeral)
        if os.path.exists(path):
            return fleet, ident, path
    raise ImageFormatError(f"fleet: no overlay {fleet.label(ident)} in {fleet.dir.directory}")


def overlay_info(fleet: FleetFiles, ident: str, ephemeral: bool, path: str) -> dict:
    """describe_overlay() plus how clients name the overlay and its mode."""
    return {"overlay": fleet.label(ident), "mode": OVERLAY_MODES[ephemeral],
            **describe_overlay(path, fleet.golden_format)}


# -- commands ------------------------------------------------------------------------

def cmd_list(args) -> int:
    """`qcownbd fleet list`: one line per overlay."""
    setup_logging(args)
    rows = []
    for fleet in fleets_of(args.source):
        for ident, ephemeral, path in fleet.dir.overlays():
            try:
                rows.append(overlay_info(fleet, ident, ephemeral, path))
            except ImageFormatError as exc:
                rows.append({"overlay": fleet.label(ident), "mode": OVERLAY_MODES[ephemeral],
                             "filename": path, "error": str(exc)})
    if args.json:
        print(json.dumps(rows, indent=4))
        return 0
    print(f"{'OVERLAY':<24} {'MODE':<10} {'ALLOCATED':>10} {'IN USE':<6} FILE")
    for row in rows:
        allocated = human_size(row["allocated-bytes"]) if "error" not in row else "?"
        used = "error" if "error" in row else "yes" if row["in-use"] else "no"
        print(f"{row['overlay']:<24} {row['mode']:<10} {allocated:>10} {used:<6} "
              f"{row['filename']}")
    return 0


def cmd_info(args) -> int:
    """`qcownbd fleet info`: the overlay, its golden image and allocation."""
    setup_logging(args)
    fleet, ident, path = find_overlay(args.source, args.overlay)
    info = overlay_info(fleet, ident, path == fleet.dir.path(ident, True), path)
    if args.json:
        print(json.dumps(info, indent=4))
        return 0
    print("\n".join([
        f"overlay: {info['overlay']} ({info['mode']}{', in use' if info['in-use'] else ''})",
        f"file: {path}",
        f"golden image: {info.get('full-backing-filename', '-')} "
        f"({info.get('backing-format', '-')})",
        f"virtual size: {human_size(info['virtual-size'])} ({info['virtual-size']} bytes)",
        f"allocated: {human_size(info['allocated-bytes'])} ({info['allocated-bytes']} bytes)",
        f"disk size: {human_size(info['actual-size'])}"]))
    return 0


def cmd_delete(args) -> int:
    """`qcownbd fleet delete`: remove overlays (every name is found before any is deleted)."""
    setup_logging(args)
    found = [find_overlay(args.source, name) for name in args.overlays]
    for fleet, ident, path in found:
        if not remove_unless_in_use(path):
            raise ImageFormatError(f"fleet: {fleet.label(ident)} is in use by a client; "
                                   "not deleted")
    return 0


def cmd_commit(args) -> int:
    """`qcownbd fleet commit`: golden+overlay flattened into a new image."""
    setup_logging(args)
    fleet, ident, path = find_overlay(args.source, args.overlay)
    src = open_image(path, fmt="qcow1", read_only=True, backing_format=fleet.golden_format)
    try:
        out_format = normalise_format(args.output_format or src.backing.format_name,
                                      "output format")
        bar = Progress(src.size, sys.stderr.isatty() and not args.quiet)
        convert_to_new(src, args.new_golden, out_format, progress=bar.update)
        bar.finish()
    finally:
        src.close()
    return 0
