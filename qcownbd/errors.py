"""The one exception hierarchy of qcownbd.

Every error a client or an operator can see is one of these; the errno an
NBD client receives is decided by `qcownbd.nbd.protocol.nbd_error_code`.
"""

import errno as _errno


class QcownbdError(Exception):
    """Base of every error qcownbd raises on purpose."""


class ImageFormatError(QcownbdError):
    """An image cannot be opened: bad header, hostile metadata, bad backing chain."""


class ImageIOError(QcownbdError):
    """An I/O operation on an open image failed; carries the errno to report."""

    def __init__(self, err: int, message: str = ""):
        super().__init__(message or _errno.errorcode.get(err, str(err)))
        self.errno = err


class ProtocolError(QcownbdError):
    """A peer broke the NBD protocol; the connection it came on is closed."""


class ConfigError(QcownbdError):
    """A configuration file or command line is wrong."""


class UsageError(QcownbdError):
    """A command-line mistake: reported as one line, exit status 2."""
