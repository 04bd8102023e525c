"""What the commands show on a terminal: log lines, sizes, progress bars.

A leaf: it knows nothing of images, exports or NBD, so every command-line
module (and the service) can use it without importing one another.
"""

import logging
import os
import sys


def setup_logging(args, default_level: str = "warning") -> None:
    """One line per event; no timestamps of our own under journald (JOURNAL_STREAM)."""
    if args.log_level:
        level = args.log_level
    elif args.verbose:
        level = "debug"
    elif args.quiet:
        level = "error"
    else:
        level = default_level
    if os.environ.get("JOURNAL_STREAM"):
        fmt = "%(levelname)s %(message)s"
    else:
        fmt = "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr, force=True)


def human_size(size: int) -> str:
    """qemu-img's size style: "64 MiB", "9.54 MiB", "0.977 MiB", "560 B"."""
    value, unit = float(size), 0
    # like QEMU's size_to_str: three significant digits, so move up at 1000
    while value >= 1000 and unit < 6:
        value /= 1024
        unit += 1
    return f"{value:.3g} {['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'][unit]}"


class Progress:
    """qemu-img's "    (45.00/100%)" line on stderr, when it is a terminal."""

    def __init__(self, total: int, enabled: bool):
        self.total = max(total, 1)
        self.enabled = enabled
        self.shown = -1

    def update(self, done: int) -> None:
        """Show ``done`` of the total, when the hundredth of a percent changed."""
        percent = int(10000 * done / self.total)
        if self.enabled and percent != self.shown:
            self.shown = percent
            sys.stderr.write(f"\r    ({percent / 100:.2f}/100%)")
            sys.stderr.flush()

    def finish(self) -> None:
        """Show 100% and end the line."""
        if self.enabled:
            self.update(self.total)
            sys.stderr.write("\n")
