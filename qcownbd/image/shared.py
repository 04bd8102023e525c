"""One open image lent read-only to many holders: a fleet's golden image.

Every overlay of a fleet, and the fleet export itself, reads the golden
image through a `SharedView` of one `SharedImage`, so the file is opened
(and locked) once however many clients there are.  A view is a real
`Backend`: closing it (an overlay closing its backing chain) lets go of the
golden image, which closes once, when its last view does.
"""

import threading

from qcownbd.image.backend import Backend, Extent


class SharedImage:
    """An open backend shared by views; closed when the last view is closed.

    Views may be taken and released from any thread (overlays open in worker
    threads).
    """

    def __init__(self, backend: Backend):
        self.backend = backend
        self._views = 0
        self._lock = threading.Lock()

    def view(self) -> "SharedView":
        """A new holder's view of the image."""
        with self._lock:
            if self.backend is None:
                raise ValueError("the shared image is closed")
            self._views += 1
        return SharedView(self)

    def release(self) -> None:
        """A view was closed; the last one closes the image."""
        with self._lock:
            self._views -= 1
            backend = None
            if not self._views:
                backend, self.backend = self.backend, None
        if backend is not None:
            backend.close()


class SharedView(Backend):
    """One holder's handle on a SharedImage: every call goes to the shared backend,
    except `close`, which only lets go of it."""

    def __init__(self, shared: SharedImage):
        self._shared = shared
        self._image = image = shared.backend
        self._closed = False
        self.path = image.path
        self.size = image.size
        self.present_as(image)
        self.backing = image.backing

    def read_into(self, offset: int, buf: memoryview) -> None:
        """The shared image's bytes."""
        self._image.read_into(offset, buf)

    def write(self, offset: int, data) -> None:
        """Passed on (a golden image is read-only: refused there)."""
        self._image.write(offset, data)

    def flush(self) -> None:
        """Passed on."""
        self._image.flush()

    def trim(self, offset: int, length: int) -> None:
        """Passed on."""
        self._image.trim(offset, length)

    def write_zeroes(self, offset: int, length: int, may_trim: bool = True,
                     fast: bool = False) -> None:
        """Passed on."""
        self._image.write_zeroes(offset, length, may_trim, fast)

    def block_status(self, offset: int, length: int) -> list[Extent]:
        """The shared image's allocation."""
        return self._image.block_status(offset, length)

    def host_range(self, offset: int, length: int) -> tuple[int, int] | None:
        """The shared image's file range (so its reads may go out by sendfile)."""
        return self._image.host_range(offset, length)

    def cache(self, offset: int, length: int) -> None:
        """Passed on."""
        self._image.cache(offset, length)

    @property
    def has_pending_metadata(self) -> bool:
        """The shared image's (never true for a read-only one)."""
        return self._image.has_pending_metadata

    def close(self) -> None:
        """Let go of the shared image (idempotent); the last view closes it."""
        if not self._closed:
            self._closed = True
            self._shared.release()
