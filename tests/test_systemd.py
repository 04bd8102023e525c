"""The systemd units, socket activation and readiness notification with real tools.

PID 1 is not systemd here, so the units are checked with `systemd-analyze`
and the server's side of the contract is driven the way systemd drives it:
`systemd-socket-activate` hands it a listening socket, and a datagram socket
bound by the test stands in for $NOTIFY_SOCKET.
"""

import json
import contextlib
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import fields
from pathlib import Path

import pytest

from helpers import (
    REPO, free_port, listening_tcp_ports, qcownbd_cmd, qcownbd_env, raw_file, run,
    stop_process, wait_for, wait_listening,
)
from qcownbd.config import ExportConfig, ServerConfig, load_config
from qcownbd.config import FleetConfig, parse_config
from qcownbd.control import DEFAULT_PATH

UNITS = ("qcownbd.service", "qcownbd.socket", "qcownbd@.service", "qcownbd@.socket")
INSTALLED_BINARY = "/usr/local/bin/qcownbd"
IMAGE_SIZE = 4 * 1024 * 1024


def unit_settings(name: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat; comments skipped)."""
    settings: dict[str, list[str]] = {}
    for line in (REPO / "systemd" / name).read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@pytest.fixture
def unit_dir(tmp_path):
    """Copies of the units whose ExecStart runs this checkout's qcownbd (verify
    insists that the binary exists; /usr/local/bin/qcownbd may not)."""
    runner = tmp_path / "qcownbd"
    runner.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m qcownbd \"$@\"\n")
    runner.chmod(0o755)
    for name in UNITS:
        text = (REPO / "systemd" / name).read_text()
        (tmp_path / name).write_text(text.replace(INSTALLED_BINARY, str(runner)))
    return tmp_path


@pytest.mark.timeout(60)
@pytest.mark.parametrize("units", [
    ("qcownbd.service", "qcownbd.socket"),
    ("qcownbd@.service", "qcownbd@.socket"),
    ("qcownbd@demo.service", "qcownbd@demo.socket"),
])
def test_units_pass_systemd_analyze_verify(unit_dir, units):
    out = run(["systemd-analyze", "verify", *units], cwd=unit_dir, check=False, timeout=30)
    assert out.returncode == 0 and not out.stderr.strip(), out.stderr


@pytest.mark.timeout(60)
def test_services_are_hardened(unit_dir):
    # Exposure 0.0 (locked down) .. 10.0 (wide open), in tenths for --threshold.
    out = run(["systemd-analyze", "security", "--offline=yes", "--threshold=15",
               "qcownbd.service", "qcownbd@.service"], cwd=unit_dir, check=False, timeout=30)
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("qcownbd.service", "qcownbd@.service"):
        settings = unit_settings(name)
        assert settings["Type"] == ["notify"]
        assert settings["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
        assert settings["ExecStart"][0].startswith(f"{INSTALLED_BINARY} serve --config /etc/qcownbd/")
        assert settings["CapabilityBoundingSet"] == [""]
        assert settings["RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
        assert settings["SystemCallFilter"][0] == "@system-service"
        for key in ("DynamicUser", "NoNewPrivileges", "PrivateTmp", "PrivateDevices",
                    "ProtectHome", "MemoryDenyWriteExecute", "RestrictNamespaces"):
            assert settings[key] == ["yes"], key
        assert settings["ProtectSystem"] == ["strict"]
        assert settings["LimitNOFILE"] == ["65536"]


def test_sockets_listen_where_documented():
    assert unit_settings("qcownbd.socket")["ListenStream"] == ["127.0.0.1:10809"]
    assert unit_settings("qcownbd@.socket")["ListenStream"] == ["/run/qcownbd/%i.sock"]
    assert "/etc/qcownbd/%i.toml" in unit_settings("qcownbd@.service")["ExecStart"][0]


def test_example_config_loads_and_documents_every_option():
    example = REPO / "systemd" / "exports.toml"
    shipped = load_config(str(example))
    assert shipped.listen == ["127.0.0.1:10809"]
    assert shipped.exports == {}, "as shipped, every export is a commented example"
    # The examples, uncommented (their table and "key = value" lines), load.
    text = example.read_text()
    config = parse_config(tomllib.loads(re.sub(r"^# (?=\[|\w+ = )", "", text, flags=re.M)))
    assert sorted(config.exports) == ["fleet", "golden", "scratch"]
    assert config.exports["golden"].read_only and config.exports["golden"].format == "qcow1"
    assert not config.exports["scratch"].read_only
    assert isinstance(config.exports["fleet"], FleetConfig)
    # Every option the loader knows appears in the example, set or commented.
    options = ({f.name for f in fields(ServerConfig)} - {"exports"}) \
        | ({f.name for f in (*fields(ExportConfig), *fields(FleetConfig))} - {"name"})
    for option in options:
        assert re.search(rf"^(# )?{option} = ", text, re.MULTILINE), option


@pytest.fixture
def raw_image(tmp_path):
    """A raw image with a recognisable first sector."""
    return raw_file(tmp_path / "disk.raw", b"qcownbd socket activation".ljust(512, b"."),
                    IMAGE_SIZE)


def start_activated(listen: str, *serve_args) -> subprocess.Popen:
    """`systemd-socket-activate -l LISTEN qcownbd serve ...`, which binds LISTEN,
    waits for the first client, then execs the server with LISTEN_FDS=1."""
    cmd = ["systemd-socket-activate", "-l", listen, "-E", f"PYTHONPATH={REPO}",
           *qcownbd_cmd("serve", *serve_args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # It prints "Listening on ..." once the socket is bound.
    line = proc.stderr.readline()
    assert "Listening on" in line, line + proc.stderr.read()
    return proc


def stop(proc: subprocess.Popen) -> int:
    """SIGTERM and wait; the exit status."""
    status = stop_process(proc)
    proc.stderr.close()
    return status


@pytest.mark.timeout(90)
def test_socket_activation_over_tcp(raw_image):
    port = free_port()
    proc = start_activated(f"127.0.0.1:{port}", f"disk={raw_image}")
    try:
        info = json.loads(run(["nbdinfo", "--json", f"nbd://127.0.0.1:{port}/disk"],
                              timeout=30).stdout)
        assert info["exports"][0]["export-size"] == IMAGE_SIZE
        copy = run(["nbdcopy", f"nbd://127.0.0.1:{port}/disk", "-"], timeout=30).stdout
        assert copy.startswith("qcownbd socket activation..")
        # The inherited socket replaces --listen: no default 10809 of its own.
        assert listening_tcp_ports(proc.pid) == {port}
    finally:
        assert stop(proc) == 0


@pytest.mark.timeout(90)
def test_socket_activation_over_unix_socket(raw_image, tmp_path):
    sock = tmp_path / "qcownbd.sock"
    proc = start_activated(str(sock), f"disk={raw_image}")
    try:
        out = run(["nbdinfo", "--size", f"nbd+unix:///disk?socket={sock}"], timeout=30)
        assert int(out.stdout) == IMAGE_SIZE
        assert listening_tcp_ports(proc.pid) == set()
    finally:
        assert stop(proc) == 0


class NotifyReceiver:
    """The datagram socket systemd would offer as $NOTIFY_SOCKET."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[dict[str, str]] = []

    def wait_for(self, key: str, value: str | None = None, timeout: float = 20) -> dict:
        """Collect messages until one sets KEY (to VALUE); return that message."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(65536).decode()
            except socket.timeout:
                break
            message = dict(line.split("=", 1) for line in data.splitlines() if "=" in line)
            self.messages.append(message)
            if key in message and value in (None, message[key]):
                return message
        raise AssertionError(f"no {key}={value} within {timeout}s; got {self.messages}")

    def keys_seen(self) -> list[str]:
        """Every KEY=1 state in arrival order (READY, RELOADING, STOPPING)."""
        return [k for m in self.messages for k, v in m.items() if v == "1"]


@pytest.fixture
def notify(tmp_path):
    receiver = NotifyReceiver(tmp_path / "notify.sock")
    yield receiver
    receiver.sock.close()


def connections_in_status(message: dict) -> int:
    """N of "N connection(s)" in a STATUS= line."""
    return int(re.search(r"(\d+) connection", message["STATUS"]).group(1))


def exports_in_status(message: dict) -> int:
    """N of "N export(s)" in a STATUS= line."""
    return int(re.search(r"(\d+) export", message["STATUS"]).group(1))


def write_config(path: Path, port: int, exports: dict[str, Path]) -> None:
    """An exports.toml listening on PORT with the given NAME -> image path."""
    lines = ["[server]", f'listen = ["127.0.0.1:{port}"]', ""]
    for name, image in exports.items():
        lines += [f"[exports.{name}]", f'path = "{image}"', 'format = "raw"', ""]
    path.write_text("\n".join(lines))


@contextlib.contextmanager
def serving_notifying(config: Path, notify: NotifyReceiver):
    """`qcownbd serve --config CONFIG` telling ``notify`` what systemd would hear;
    killed at the end if the test did not stop it."""
    proc = subprocess.Popen(qcownbd_cmd("serve", "--config", config),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO),
                                 "NOTIFY_SOCKET": str(notify.path)})
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.mark.timeout(120)
def test_notify_ready_reload_stopping(raw_image, tmp_path, notify):
    port = free_port()
    config = tmp_path / "exports.toml"
    write_config(config, port, {"disk": raw_image})
    with serving_notifying(config, notify) as proc:
        notify.wait_for("READY", "1")
        # READY=1 must mean "clients can connect now".
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) == 0
        assert exports_in_status(notify.messages[-1]) == 1, notify.messages
        assert run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/disk"]).stdout.strip() \
            == str(IMAGE_SIZE)
        # STATUS= follows the connections as they come and go.
        with socket.create_connection(("127.0.0.1", port)):
            assert connections_in_status(notify.wait_for("STATUS")) == 1
        assert connections_in_status(notify.wait_for("STATUS")) == 0

        # Reload picks up a new export, wrapped in RELOADING=1 ... READY=1.
        second = tmp_path / "second.raw"
        second.write_bytes(b"\0" * 65536)
        write_config(config, port, {"disk": raw_image, "second": second})
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", "1")
        assert exports_in_status(notify.wait_for("READY", "1")) == 2
        assert notify.keys_seen() == ["READY", "RELOADING", "READY"]
        assert run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/second"]).stdout.strip() \
            == "65536"

        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", "1")
        assert proc.wait(20) == 0
        assert notify.keys_seen() == ["READY", "RELOADING", "READY", "STOPPING"]


@pytest.mark.timeout(60)
def test_a_failed_reload_still_says_ready_with_a_status_that_says_why(raw_image, tmp_path,
                                                                       notify):
    port = free_port()
    config = tmp_path / "exports.toml"
    write_config(config, port, {"disk": raw_image})
    with serving_notifying(config, notify) as proc:
        notify.wait_for("READY", "1")
        config.write_text(config.read_text() + '[exports.bad]\npath = "a\\u0000b"\n')
        proc.send_signal(signal.SIGHUP)
        notify.wait_for("RELOADING", "1")
        ready = notify.wait_for("READY", "1")
        assert ready["STATUS"].startswith("reload failed") and "NUL" in ready["STATUS"]
        assert run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/disk"]).stdout.strip() \
            == str(IMAGE_SIZE)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert "Traceback" not in proc.stderr.read()


# Sets the kernel's W^X policy (PR_SET_MDWE, Linux >= 6.3: what systemd's
# MemoryDenyWriteExecute= enforces with seccomp), which survives execve, then
# becomes the server.
UNDER_MDWE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
if libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
    sys.exit(77)
os.execv(sys.executable, [sys.executable, "-m", "qcownbd", *sys.argv[1:]])
"""


@pytest.mark.timeout(90)
def test_server_works_under_memory_deny_write_execute(raw_image):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", UNDER_MDWE, "serve", "--listen",
                             f"127.0.0.1:{port}", f"disk={raw_image}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        try:
            wait_listening(port, proc)
        except RuntimeError:
            if proc.returncode == 77:
                pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3)")
            raise
        # A discard goes through ctypes (fallocate), the likeliest W^X trap.
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 128k", "-c", "discard 0 64k",
             "-c", "read -P 0 0 64k", "-c", "read -P 0x5a 64k 64k",
             f"nbd://127.0.0.1:{port}/disk"], timeout=30)
    finally:
        assert stop(proc) == 0


def test_units_give_the_control_socket_a_runtime_directory():
    paths = {}
    for name in ("qcownbd.service", "qcownbd@.service"):
        settings = unit_settings(name)
        command = shlex.split(settings["ExecStart"][0])
        paths[name] = command[command.index("--control") + 1]
        # the socket's directory is the service's own, created for its transient user
        assert os.path.dirname(paths[name]) == "/run/" + settings["RuntimeDirectory"][0]
        assert settings["RuntimeDirectoryMode"] == ["0700"]
    assert paths["qcownbd.service"] == DEFAULT_PATH, "qcownbd status finds it unasked"
    assert "%i" in paths["qcownbd@.service"]


@pytest.mark.timeout(60)
def test_the_units_server_command_answers_status_on_its_control_socket(raw_image, tmp_path):
    # ExecStart of qcownbd.service, with /etc and /run moved into tmp_path
    command = shlex.split(unit_settings("qcownbd.service")["ExecStart"][0])[1:]
    config = tmp_path / "exports.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n'
                      f'[exports.d]\npath = "{raw_image}"\nformat = "raw"\n')
    (tmp_path / "run/qcownbd/control").mkdir(parents=True, mode=0o700)
    args = [arg.replace("/etc/qcownbd/exports.toml", str(config)).replace("/run", f"{tmp_path}/run")
            for arg in command]
    proc = subprocess.Popen(qcownbd_cmd(*args), env=qcownbd_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        socket_path = tmp_path / "run/qcownbd/control/socket"
        assert wait_for(socket_path.exists, 20), proc.stderr.read() if proc.poll() else ""
        out = run(qcownbd_cmd("status", "--control", str(socket_path)), env=qcownbd_env())
        assert "d" in out.stdout.split() and str(raw_image) in out.stdout
    finally:
        assert stop(proc) == 0
