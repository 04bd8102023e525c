"""The one exception hierarchy of qcownbd.

Every error carries two texts: ``str(exc)``, the full detail for the
operator's log (paths, system messages), and ``exc.public``, what a client
may read (never a host path).  The errno an NBD client receives is decided
by `qcownbd.nbd.protocol.nbd_error_code`, from the error and the command.
"""

import errno as _errno
import os as _os


class QcownbdError(Exception):
    """Base of every error qcownbd raises on purpose.

    ``public`` is the text a client may be sent; without one the class's
    ``default_public`` is used, which names nothing of the host.
    """

    default_public = "internal error"

    def __init__(self, detail: str = "", *, public: str | None = None):
        super().__init__(detail)
        self._public = public

    @property
    def public(self) -> str:
        """What a client may read about this error (no host paths)."""
        return self._public if self._public is not None else self.default_public


class ImageFormatError(QcownbdError):
    """An image cannot be opened: bad header, hostile metadata, bad backing chain."""

    default_public = "the image cannot be opened"


class ImageIOError(QcownbdError):
    """An I/O operation on an open image failed; carries the errno to report.

    Its public text is the errno's description ("No space left on device"):
    the detail names the file.
    """

    def __init__(self, err: int, detail: str = "", *, public: str | None = None):
        super().__init__(detail or _errno.errorcode.get(err, str(err)), public=public)
        self.errno = err

    @property
    def public(self) -> str:
        """The given public text, else the errno's description."""
        return self._public if self._public is not None else _os.strerror(self.errno)


class NoSuchExport(QcownbdError, LookupError):
    """A client named an export it cannot have: absent, broken, full or not for it.

    The public text names only what the client itself asked for.
    """

    def __init__(self, detail: str, *, public: str | None = None):
        super().__init__(detail, public=detail if public is None else public)


class ExportOpening(QcownbdError):
    """The export a client named is being opened off the event loop (a fleet's
    overlay scans its tables first, a live snapshot switches its image): ask
    again once ``pending``, a
    `concurrent.futures.Future`, is done."""

    def __init__(self, pending):
        super().__init__("the export is being opened")
        self.pending = pending


class ProtocolError(QcownbdError):
    """A peer broke the NBD protocol; the connection it came on is closed."""

    default_public = "protocol error"


class ConfigError(QcownbdError):
    """A configuration file or command line is wrong."""


class UsageError(QcownbdError):
    """A command-line mistake: reported as one line, exit status 2."""


class ControlError(QcownbdError):
    """A control-socket request could not be carried out (`qcownbd.control`); its
    text is the one line the asking command prints."""


class HandoverError(QcownbdError):
    """A live handover to a successor failed (`qcownbd.upgrade`): the running server
    keeps serving; the text is the one line `qcownbd upgrade` prints."""
