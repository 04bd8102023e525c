"""Fault injection for the image I/O layer: a testing aid, inert unless configured.

The backends make their file system calls through `syscalls`.  Without the
environment variable ``QCOWNBD_FAULTS`` that name *is* the `os` module, so
the hot path costs exactly what ``os.pwritev(...)`` costs.  With it, `syscalls`
is a namespace whose ``pread``/``preadv``/``pwrite``/``pwritev``/``fdatasync``/``fsync``
fail as the rules say.  Rules are separated by ``;``::

    QCOWNBD_FAULTS="write:EIO:after=100"            # every write after the 100th fails
    QCOWNBD_FAULTS="write:ENOSPC:prob=0.1,seed=1"   # one write in ten, reproducibly
    QCOWNBD_FAULTS="sync:EIO:count=1;read:EIO:while=/run/faults-on"

``OP:ERRNO[:OPTIONS]`` where OP is ``read`` (pread, preadv), ``write``
(pwrite, pwritev) or ``sync`` (fdatasync, fsync; ``fdatasync`` is accepted
as a name for it), ERRNO a name from `errno`, and OPTIONS comma-separated:

* ``after=N``   let the first N calls of OP through;
* ``count=N``   fail at most N times, then never again;
* ``prob=P``    fail an eligible call with probability P (default 1);
* ``seed=S``    seed of that coin (default 0: runs are reproducible);
* ``while=PATH`` fail only while PATH exists (tests switch faults on and off).

A failing call raises OSError(ERRNO) before touching the file, as a full
disk or a dead sector would.  A malformed value stops the program with a
one-line message at import time.
"""

import errno
import os
import random
import threading
from types import SimpleNamespace

ENV = "QCOWNBD_FAULTS"
#: the os functions each operation covers
OPERATIONS = {
    "read": ("pread", "preadv"),
    "write": ("pwrite", "pwritev"),
    "sync": ("fdatasync", "fsync"),
}
ALIASES = {"fdatasync": "sync", "fsync": "sync", "pwrite": "write", "pread": "read"}


class FaultRule:
    """One ``OP:ERRNO:OPTIONS`` rule and its counters (thread-safe)."""

    def __init__(self, op: str, err: int, *, after: int = 0, count: int | None = None,
                 prob: float = 1.0, seed: int = 0, while_path: str | None = None):
        self.op, self.errno = op, err
        self.after, self.count, self.prob = after, count, prob
        self.while_path = while_path
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.calls = self.failures = 0

    def should_fail(self) -> bool:
        """Count one call of the rule's operation; True when it must fail."""
        if self.while_path is not None and not os.path.exists(self.while_path):
            return False
        with self._lock:
            self.calls += 1
            if self.calls <= self.after:
                return False
            if self.count is not None and self.failures >= self.count:
                return False
            if self.prob < 1.0 and self._random.random() >= self.prob:
                return False
            self.failures += 1
            return True


def parse_rules(spec: str) -> list[FaultRule]:
    """The rules of a ``QCOWNBD_FAULTS`` value; ValueError names what is wrong."""
    rules = []
    for text in filter(None, (part.strip() for part in spec.split(";"))):
        parts = text.split(":", 2)
        if len(parts) < 2:
            raise ValueError(f"{text!r}: expected OP:ERRNO[:OPTIONS]")
        op = ALIASES.get(parts[0], parts[0])
        if op not in OPERATIONS:
            raise ValueError(f"{text!r}: unknown operation {parts[0]!r} "
                             f"(use {', '.join(OPERATIONS)})")
        err = getattr(errno, parts[1], None)
        if not isinstance(err, int):
            raise ValueError(f"{text!r}: unknown errno {parts[1]!r}")
        options = _parse_options(text, parts[2] if len(parts) == 3 else "")
        rules.append(FaultRule(op, err, **options))
    return rules


def _parse_options(rule: str, text: str) -> dict:
    converters = {"after": int, "count": int, "prob": float, "seed": int, "while": str}
    options = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in converters:
            raise ValueError(f"{rule!r}: bad option {item!r} "
                             f"(use {', '.join(k + '=' for k in converters)})")
        try:
            options["while_path" if key == "while" else key] = converters[key](value)
        except ValueError:
            raise ValueError(f"{rule!r}: bad value in {item!r}") from None
    return options


def _faulty(name: str, rules: list[FaultRule]):
    """``os.<name>`` behind the rules; os is looked up per call so monkeypatching still works."""
    def call(*args, **kwargs):
        for rule in rules:
            if rule.should_fail():
                raise OSError(rule.errno, f"{os.strerror(rule.errno)} (injected by {ENV})")
        return getattr(os, name)(*args, **kwargs)
    call.__name__ = name
    return call


def build_syscalls(spec: str):
    """The `syscalls` namespace for ``spec``: `os` itself when it has no rules."""
    rules = parse_rules(spec)
    if not rules:
        return os
    functions = {}
    for op, names in OPERATIONS.items():
        mine = [rule for rule in rules if rule.op == op]
        for name in names:
            functions[name] = _faulty(name, mine) if mine else getattr(os, name)
    return SimpleNamespace(rules=rules, **functions)


def injecting() -> bool:
    """True when ``QCOWNBD_FAULTS`` configured faults for this process."""
    return syscalls is not os


try:
    syscalls = build_syscalls(os.environ.get(ENV, ""))
except ValueError as _exc:
    raise SystemExit(f"qcownbd: error: {ENV}: {_exc}") from None
