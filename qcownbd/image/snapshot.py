"""Throw-away writes (`serve --snapshot`, qemu-nbd's -s): each image is served
through a fresh QCOW1 overlay whose backing file it is.

The overlays live in a private temporary directory (mode 0700, under
$TMPDIR): clients' writes land there, the image itself is only ever opened
read-only, and the directory is deleted with everything in it at exit.
"""

import os
import shutil
import tempfile

from qcownbd.errors import ImageFormatError
from qcownbd.image.probe import open_image
from qcownbd.image.qcow1 import create_qcow1


class ThrowawayOverlays:
    """A temporary directory of overlays, removed when the `with` block ends."""

    def __init__(self):
        self.directory: str | None = None

    def __enter__(self):
        return self

    def __exit__(self, *_exc):
        self.remove()

    def overlay(self, base: str, base_format: str = "auto") -> str:
        """A new empty overlay of the image ``base``, which backs it under its absolute
        path; ImageFormatError (one line) when ``base`` cannot be opened."""
        base = os.path.abspath(base)
        image = open_image(base, fmt=base_format, read_only=True)
        try:
            size = image.size
        finally:
            image.close()
        if self.directory is None:
            self.directory = tempfile.mkdtemp(prefix="qcownbd-snapshot-")
        path = os.path.join(self.directory, f"{len(os.listdir(self.directory))}.qcow")
        try:
            create_qcow1(path, size, base)
        except OSError as exc:
            raise ImageFormatError(f"cannot create a snapshot overlay in {self.directory}: "
                                   f"{exc.strerror or exc}") from None
        return path

    def remove(self) -> None:
        """Delete the directory and the overlays in it (their writes are thrown away)."""
        if self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None
