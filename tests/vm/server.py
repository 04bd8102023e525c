"""Stopping a test's qcownbd server mid-test, to inspect its image and its log."""

import signal


def stop_server(server, timeout: float = 20.0) -> tuple[int, str]:
    """SIGTERM a conftest QcownbdServer; return (exit status, stderr).

    The qcownbd_server fixture's own teardown still runs afterwards and only
    closes the pipes, because the process has already gone.
    """
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(timeout)
    return server.proc.returncode, server.proc.stderr.read()
