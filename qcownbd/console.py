"""What the commands show on a terminal: log lines, sizes, progress bars.

A leaf: it knows nothing of images, exports or NBD, so every command-line
module (and the service) can use it without importing one another.
"""

import logging
import os
import re
import sys

from qcownbd.errors import UsageError

#: sd-daemon(3) priorities of the log levels: journald files each line under its
#: "<N>" prefix, so `journalctl -p err` finds the errors
JOURNAL_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4,
                      logging.ERROR: 3, logging.CRITICAL: 2}


def stderr_is_journal() -> bool:
    """Whether stderr is the journal's stream: JOURNAL_STREAM names its device:inode
    (systemd.exec(5)), which a redirection or a pipe to another program would change."""
    try:
        device, inode = (int(part) for part in os.environ["JOURNAL_STREAM"].split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (KeyError, ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def _priority(level: int) -> int:
    """The priority of a log level; one between two standard levels takes the lower's."""
    for standard in (logging.CRITICAL, logging.ERROR, logging.WARNING, logging.INFO):
        if level >= standard:
            return JOURNAL_PRIORITIES[standard]
    return JOURNAL_PRIORITIES[logging.DEBUG]


def journal_prefix(level: int) -> str:
    """The "<N>" that gives a line written to stderr its priority under journald,
    "" when stderr is not the journal."""
    return f"<{_priority(level)}>" if stderr_is_journal() else ""


class JournalFormatter(logging.Formatter):
    """Lines with sd-daemon(3) priority prefixes, every line of a record (a
    traceback's too: journald makes an entry of each)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's text, each line prefixed with its priority."""
        prefix = f"<{_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).splitlines())


def setup_logging(args, default_level: str = "warning") -> None:
    """One line per event; no timestamps of our own under journald (JOURNAL_STREAM),
    and priority prefixes when stderr is the journal itself."""
    if args.log_level:
        level = args.log_level
    elif args.verbose:
        level = "debug"
    elif args.quiet:
        level = "error"
    else:
        level = default_level
    handler = logging.StreamHandler(sys.stderr)
    if stderr_is_journal():
        handler.setFormatter(JournalFormatter("%(levelname)s %(message)s"))
    elif os.environ.get("JOURNAL_STREAM"):
        # set by systemd for the unit: what we write most likely ends in the journal
        # anyway (through a pipe), which stamps the time itself
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def human_size(size: int) -> str:
    """qemu-img's size style: "64 MiB", "9.54 MiB", "0.977 MiB", "560 B"."""
    value, unit = float(size), 0
    # like QEMU's size_to_str: three significant digits, so move up at 1000
    while value >= 1000 and unit < 6:
        value /= 1024
        unit += 1
    return f"{value:.3g} {['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB'][unit]}"


_SIZE = re.compile(r"(\d+(?:\.\d+)?)([bkmgtpe]?)", re.IGNORECASE)
_UNITS = "bkmgtpe"


def parse_size(text: str) -> int:
    """Bytes from "10000000", "64M", "1.5G" (K, M, G, T, P, E: powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise UsageError(f"invalid size {text!r} (examples: 1000000, 64M, 2G)")
    number, unit = match.groups()
    scale = 1024 ** _UNITS.index(unit.lower() or "b")
    if "." in number and scale == 1:
        raise UsageError(f"invalid size {text!r}: fractional bytes")
    size = int(float(number) * scale) if "." in number else int(number) * scale
    if size <= 0:
        raise UsageError(f"invalid size {text!r}: must be positive")
    if size >= 1 << 63:
        raise UsageError(f"invalid size {text!r}: too large")
    return size


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
