"""The suite's pytest hooks and fixtures; the helpers they use are in helpers.py."""

import contextlib

import pytest

from helpers import LoggedServer, QcownbdServer


@pytest.fixture
def qcownbd_server():
    """Factory: start servers with `qcownbd_server(args...)`; all stopped at teardown."""
    servers = []

    def start(*args, **kwargs):
        server = QcownbdServer(*args, **kwargs)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture
def logged_server():
    """Factory like qcownbd_server, but the stderr is drained (LoggedServer)."""
    with contextlib.ExitStack() as stack:
        yield lambda *args, **kwargs: stack.enter_context(LoggedServer(*args, **kwargs))


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", default=False,
                     help="run the long variants (minutes of fuzzing, hundreds of crash points)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    skip_long = pytest.mark.skip(reason="long variant: run with --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip_long)


@pytest.fixture(scope="session")
def vm_kit():
    """Kernel + cached base initramfs for QEMU test guests (tests/vm); fails, never skips."""
    from vm.initramfs import guest_kit
    from vm.packages import PackageError
    try:
        return guest_kit()
    except PackageError as exc:
        pytest.fail(f"cannot prepare test guests: {exc}")
