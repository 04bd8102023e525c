"""The `qcownbd` command: one argparse front for every subcommand.

The subcommands register themselves here (`serve`, the image commands
create/info/map/check/convert/commit, `fleet`, and `status`/`snapshot`,
which ask a running server); each only parses its arguments
and calls the code it drives.  Every failure reaches the user as one line
on stderr and a non-zero exit: 1 when the command failed, 2 when its
command line is wrong (`helptext` writes them down under every --help).
"""

import argparse
import logging
import os
import sys

from qcownbd import __version__
from qcownbd.cli import control, fleet, helptext, image, serve
from qcownbd.console import journal_prefix
from qcownbd.errors import QcownbdError, UsageError
from qcownbd.upgrade import report_failure

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that reports mistakes as one line (exit 2), like our other errors,
    takes no abbreviated options (`serve --list` is not `--listen`), and ends its
    help with the command's examples and exit statuses."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def format_help(self) -> str:
        """argparse's help, then the examples and exit statuses as written."""
        text = super().format_help()
        notes = helptext.epilog(self.prog)
        return f"{text}\n{notes}" if notes else text

    def error(self, message):
        # main() already says "qcownbd: "; name only the subcommand, if any
        command = self.prog.removeprefix("qcownbd").strip()
        raise UsageError(f"{command + ': ' if command else ''}{message} (see --help)")


def common_options() -> argparse.ArgumentParser:
    """Options every subcommand takes: verbosity and log level."""
    common = _Parser(add_help=False)
    group = common.add_argument_group("output")
    group.add_argument("-q", "--quiet", action="store_true",
                       help="only errors; no progress bars")
    group.add_argument("-v", "--verbose", action="store_true",
                       help="debug messages")
    group.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="log level (default: info for serve, warning otherwise)")
    return common


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every subcommand registered."""
    parser = _Parser(
        prog="qcownbd",
        description="NBD server for QCOW1 and raw disk images.",
    )
    parser.add_argument("--version", action="version", version=f"qcownbd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    common = common_options()
    serve.register(sub, common)
    image.register(sub, common)
    fleet.register(sub, common)
    control.register(sub, common)
    return parser


def main(argv=None) -> int:
    """Run one qcownbd command; return its exit status."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parser.parse_args(argv)
        #: what a live handover starts the successor with
        args.argv = argv
        if not getattr(args, "func", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args.func(args) or 0
    except BrokenPipeError:
        # the reader went away (`qcownbd map IMG | head`): not an error worth a
        # message; point stdout at /dev/null so the exit-time flush stays quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_ERROR
    except UsageError as exc:
        _say(f"qcownbd: {exc}")
        return EXIT_USAGE
    except QcownbdError as exc:
        _say(f"qcownbd: error: {exc}")
        return EXIT_ERROR
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _say(f"qcownbd: error: {exc.strerror or exc}{where}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _say("qcownbd: interrupted")
        return EXIT_INTERRUPTED


def _say(line: str) -> None:
    """A failure's one line on stderr (an error, under journald too); a successor also
    tells the server that started it."""
    print(journal_prefix(logging.ERROR) + line, file=sys.stderr)
    report_failure(line.removeprefix("qcownbd: "))
