"""qcownbd.systemd on its own: sd_listen_fds and sd_notify against real sockets."""

import json
import os
import socket
import subprocess
import sys

import pytest

from helpers import REPO
from qcownbd import systemd

# Runs in a child so that fd 3 and the environment are its own: puts a
# listening socket on fd 3, sets LISTEN_* as systemd would, reports what
# inherited_sockets() found and what is left of the environment.
CHILD = r"""
import json, os, socket, sys
from qcownbd.systemd import inherited_sockets
listener = socket.create_server(("127.0.0.1", 0))
port = listener.getsockname()[1]
if listener.fileno() != 3:
    os.dup2(listener.fileno(), 3)
    listener.close()
else:
    listener.detach()
pid = os.getpid() if sys.argv[1] == "self" else os.getppid()
os.environ.update(LISTEN_PID=str(pid), LISTEN_FDS=sys.argv[2], LISTEN_FDNAMES="nbd")
socks = inherited_sockets()
print(json.dumps({
    "port": port,
    "found": [s.getsockname()[1] for s in socks],
    "types": [int(s.type) for s in socks],
    "inheritable": [s.get_inheritable() for s in socks],
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}))
"""


def child_view(pid_owner: str, count: str) -> dict:
    """What inherited_sockets() returns in a fresh process given LISTEN_* values."""
    out = subprocess.run([sys.executable, "-c", CHILD, pid_owner, count],
                         capture_output=True, text=True, timeout=30, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout)


def test_inherited_socket_is_found_on_fd_3():
    view = child_view("self", "1")
    assert view["found"] == [view["port"]]
    assert view["types"] == [int(socket.SOCK_STREAM)]
    # Children of the server must not inherit the listener.
    assert view["inheritable"] == [False]
    assert view["env_left"] == []


@pytest.mark.parametrize("pid_owner,count", [("parent", "1"), ("self", "0"), ("self", "x")])
def test_sockets_meant_for_another_process_or_invalid_are_ignored(pid_owner, count):
    view = child_view(pid_owner, count)
    assert view["found"] == []


def test_no_listen_variables_means_no_sockets(monkeypatch):
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert systemd.inherited_sockets() == []


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A datagram socket bound where NOTIFY_SOCKET points, like systemd's."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def test_notify_sends_the_state_as_one_datagram(notify_socket):
    assert systemd.notify("READY=1\nSTATUS=serving 2 exports")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=serving 2 exports"


def test_notify_reaches_an_abstract_socket(monkeypatch):
    name = f"qcownbd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify("STOPPING=1")
        assert sock.recv(4096) == b"STOPPING=1"


def test_notify_without_systemd_is_a_silent_no(monkeypatch, tmp_path):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify("READY=1") is False
