"""Log lines that one client cannot turn into a flood.

A client sending invalid requests as fast as it can would otherwise write a
line per request (tens of thousands a second), and under journald's rate
limit that drowns every other message.  `RateLimitedLog` writes the first
``burst`` lines of each kind per ``interval`` in full, counts the rest, and
says how many were suppressed once the interval is over.
"""

import logging
import time


class RateLimitedLog:
    """A logger front that bounds the lines written per kind and interval.

    ``kind`` is a short label from a small fixed set ("READ EINVAL",
    "handshake timed out"): one window is kept per kind.  `flush` writes the
    summaries of ended windows; the server calls it on a timer, so the
    count of a flood that stopped is still reported.
    """

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0, burst: int = 10,
                 clock=time.monotonic):
        self.logger = logger
        self.interval = interval
        self.burst = burst
        self._clock = clock
        #: kind -> [window start, lines written, lines suppressed, level]
        self._windows: dict[str, list] = {}

    def log(self, level: int, kind: str, message: str, *args, **kwargs) -> None:
        """Log ``message % args`` unless ``kind`` used up its lines for this interval
        (``kwargs`` go to the logger: ``exc_info=True``)."""
        if not self.logger.isEnabledFor(level):
            return
        now = self._clock()
        window = self._windows.get(kind)
        if window is None or now - window[0] >= self.interval:
            if window is not None:
                self._summarise(kind, window)
            window = self._windows[kind] = [now, 0, 0, level]
        if window[1] < self.burst:
            window[1] += 1
            self.logger.log(level, message, *args, **kwargs)
        else:
            window[2] += 1

    def flush(self) -> None:
        """Summarise and forget every window whose interval is over."""
        now = self._clock()
        for kind, window in list(self._windows.items()):
            if now - window[0] >= self.interval:
                self._summarise(kind, window)
                del self._windows[kind]

    def _summarise(self, kind: str, window: list) -> None:
        if window[2]:
            self.logger.log(window[3], "%d more '%s' message(s) suppressed in %gs",
                            window[2], kind, self.interval)
