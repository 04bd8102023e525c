"""The image fuzzer's worker (no tests here): run in a subprocess by test_fuzz_image.

`python3 image_fuzz_worker.py DIRECTORY` opens every *.img in DIRECTORY
through probe.open_image, read-only and read-write, under an alarm per image;
reads every allocated byte and, when the read-write open is accepted, writes,
reopens and reads back.  It prints one JSON line per image: the outcome of
each open, "ok", the one-line ImageFormatError/ImageIOError, or "BAD ..."
(another exception, a multi-line message, a hang, or a traced Python
allocation beyond a constant plus a few times the file size).
"""

import json
import os
import random
import signal
import sys
import traceback
import tracemalloc

from qcownbd.errors import ImageFormatError, ImageIOError
from qcownbd.image.backend import Extent
from qcownbd.image.probe import open_image

MiB = 1 << 20
PER_IMAGE_SECONDS = 10
MEMORY_CONSTANT = 24 * MiB     # L2 cache (64 × 64 KiB), inflate cache, read buffers
READ_CAP = 64 * MiB            # bytes read per image at most (virtual sizes can be huge)


class Hang(Exception):
    """An image took longer than its time bound (PER_IMAGE_SECONDS unless told)."""


def _on_alarm(_signum, _frame):
    raise Hang()


def read_everything(img) -> None:
    """Read every allocated extent (and the first MiB), up to READ_CAP; EIO is fine."""
    buf, pos, done = memoryview(bytearray(MiB)), 0, 0
    while pos < img.size and done < READ_CAP:
        try:
            extents = img.block_status(pos, img.size - pos)
        except ImageIOError:
            extents = None
        if not extents:   # no map: read plainly, a MiB at a time
            extents = [Extent(min(MiB, img.size - pos), False, False, 1)]
        for ext in extents:
            assert ext.length > 0, "empty extent"
            if not ext.hole or pos < MiB:
                for at in range(pos, pos + min(ext.length, READ_CAP - done), MiB):
                    step = min(MiB, pos + ext.length - at)
                    try:
                        img.read_into(at, buf[:step])
                    except ImageIOError:
                        pass
                    done += step
            pos += ext.length


def write_and_reopen(path: str, img) -> None:
    """Write three pieces, close, reopen read-write and read them back."""
    rnd = random.Random(path)
    pieces = []
    for third in range(3):
        length = min(5000, img.size // 3)
        offset = rnd.randrange(third * (img.size // 3), (third + 1) * (img.size // 3) - length + 1)
        data = rnd.randbytes(length)
        img.write(offset, data)
        pieces.append((offset, data))
    img.flush()
    img.close()
    again = open_image(path, read_only=False, allowed_backing_dirs=[os.path.dirname(path)])
    try:
        for offset, data in pieces:
            got = bytearray(len(data))
            again.read_into(offset, memoryview(got))
            assert got == data, f"our write at {offset} did not read back"
    finally:
        again.close()


def probe_one(path: str, read_only: bool, seconds: int) -> str:
    """'ok', 'ImageFormatError: ...' / 'ImageIOError: ...', or 'BAD ...'."""
    signal.alarm(seconds)
    try:
        img = open_image(path, read_only=read_only, allowed_backing_dirs=[os.path.dirname(path)])
        try:
            read_everything(img)
            if not read_only:
                write_and_reopen(path, img)
        finally:
            img.close()
        return "ok"
    except (ImageFormatError, ImageIOError) as exc:
        text = f"{type(exc).__name__}: {exc}"
        return f"BAD multi-line message {text!r}" if "\n" in str(exc) else text
    except Hang:
        return f"BAD hang (> {seconds} s)"
    except BaseException:  # noqa: B036 - everything else is the bug we look for
        return "BAD " + traceback.format_exc(limit=-6)
    finally:
        signal.alarm(0)


def worker(directory: str, seconds: int = PER_IMAGE_SECONDS) -> None:
    """Probe every *.img in ``directory`` (each open within ``seconds``); one JSON line
    per image on stdout."""
    signal.signal(signal.SIGALRM, _on_alarm)
    tracemalloc.start(1)
    for name in sorted(os.listdir(directory)):
        if not name.endswith(".img"):
            continue
        path = os.path.join(directory, name)
        original = open(path, "rb").read()
        outcomes = {}
        for read_only in (True, False):
            with open(path, "wb") as f:
                f.write(original)
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            outcome = probe_one(path, read_only, seconds)
            peak = tracemalloc.get_traced_memory()[1] - base
            if peak > MEMORY_CONSTANT + 4 * len(original):
                outcome = f"BAD allocated {peak} bytes for a {len(original)}-byte file ({outcome})"
            outcomes["ro" if read_only else "rw"] = outcome
        print(json.dumps({"name": name, **outcomes}), flush=True)


if __name__ == "__main__":
    worker(sys.argv[1], *map(int, sys.argv[2:3]))
