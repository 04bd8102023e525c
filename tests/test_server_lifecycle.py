"""Running the server: signals, reload, naming, broken exports, the demo, config errors."""

import signal
import subprocess
import threading
import time

import pytest

from helpers import (
    QcownbdServer, allocated_qcow1, first_byte, free_port, qcownbd_cmd, qcownbd_env, run,
)
from nbdclient import CMD_READ, CMD_WRITE, NbdClient

pytestmark = pytest.mark.timeout(60)
SIZE = 8 * 1024 * 1024
READ_ONLY_FLAG = 1 << 1


def raw_image(tmp_path, name="d", byte=0x42):
    """A raw image with ``byte`` repeated over its first MiB."""
    path = tmp_path / f"{name}.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", path, str(SIZE)])
    run(["qemu-io", "-f", "raw", "-c", f"write -P {byte} 0 1M", path])
    return path


def serve_fails(*args) -> subprocess.CompletedProcess:
    """Run `qcownbd serve ARGS` expecting it to exit by itself."""
    return run(qcownbd_cmd("serve", *args), timeout=20, check=False, env=qcownbd_env())


def can_connect(server, export) -> bool:
    return run(["nbdinfo", "--size", server.uri(export)], check=False).returncode == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_exit_0_and_logs_connections(sig, tmp_path, qcownbd_server):
    server = qcownbd_server(f"d={raw_image(tmp_path)}")
    run(["nbdinfo", server.uri("d")])
    assert server.stop(sig) == 0
    closed = [line for line in server.stderr.splitlines() if "closed export=d" in line]
    assert len(closed) == 1 and "requests=" in closed[0] and "errors=0" in closed[0]


def test_stop_finishes_in_flight_writes(tmp_path, qcownbd_server):
    image = raw_image(tmp_path)
    server = qcownbd_server(f"d={image}")
    client = NbdClient(server.port)
    client.go()
    block = b"\x99" * 1024 * 1024
    client.send(*[client.request(CMD_WRITE, i << 20, 1 << 20, i, flags=1, payload=block)
                  for i in range(1, 6)])
    time.sleep(1)  # let the server take the requests in; unreceived ones are not in flight
    server.proc.send_signal(signal.SIGTERM)
    assert {client.simple_reply() for _ in range(5)} == {(0, i) for i in range(1, 6)}
    assert client.closed()
    assert server.proc.wait(20) == 0
    with open(image, "rb") as file:
        file.seek(1 << 20)
        assert file.read(5 << 20) == block * 5


def test_lone_export_answers_the_empty_name_and_path_names_by_stem(tmp_path, qcownbd_server):
    server = qcownbd_server(raw_image(tmp_path, "mydisk"))
    assert can_connect(server, "mydisk") and can_connect(server, "")
    assert not can_connect(server, "other")
    two = qcownbd_server(raw_image(tmp_path, "a"), raw_image(tmp_path, "b"))
    assert can_connect(two, "a") and can_connect(two, "b") and not can_connect(two, "")


def test_unopenable_cli_export_exits_with_one_line(tmp_path):
    missing = tmp_path / "missing.img"
    result = serve_fails("--listen", f"127.0.0.1:{free_port()}", f"x={missing}")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(missing) in lines[0] and "Traceback" not in result.stderr
    bad_qcow = tmp_path / "bad.qcow"
    bad_qcow.write_bytes(b"QFI\xfb\0\0\0\1" + b"\xff" * 504)
    result = serve_fails("--listen", f"127.0.0.1:{free_port()}", "--format", "qcow1", bad_qcow)
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1
    assert "bad" in result.stderr


def test_port_in_use_is_one_line(tmp_path, qcownbd_server):
    server = qcownbd_server(f"d={raw_image(tmp_path)}")
    result = serve_fails("--listen", f"127.0.0.1:{server.port}", f"e={raw_image(tmp_path, 'e')}")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("qcownbd: error: cannot listen on 127.0.0.1:")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text, needle", [
    ('[exports.a]\npath = "x"\nbogus = 1\n', "bogus"),
    ('[server]\nlisten = ["nowhere:port"]\n', "nowhere:port"),
    ('[exports.a]\npath = "x"\nformat = "vmdk"\n', "vmdk"),
    ('[exports.a]\nread_only = true\n', "path"),
    ('[server]\nport = 1\n', "port"),
    ("[exports.a\n", "c.toml"),
    ('[exports.a]\npath = "a\\u0000b"\n', "NUL byte"),
    ('[exports.a]\npath = "' + "n" * 300 + '"\n', "too long for a path"),
    ('[server]\ntls_cert = "c\\u0000"\n', "NUL byte"),
])
def test_config_errors_name_the_problem(tmp_path, text, needle):
    config = tmp_path / "c.toml"
    config.write_text(text)
    result = serve_fails("--config", config)
    assert result.returncode == 1
    assert needle in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_a_config_that_is_not_utf8_is_one_line(tmp_path):
    config = tmp_path / "c.toml"
    config.write_bytes(b'[exports.a]\npath = "/srv/\xff\xfe.raw"\n')
    result = serve_fails("--config", config)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "UTF-8" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def wait_for_export(server, export, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not can_connect(server, export):
        assert time.monotonic() < deadline, f"export {export} never appeared"
        time.sleep(0.1)


def test_reload_of_a_description_keeps_a_busy_read_write_export(tmp_path, qcownbd_server):
    """Only the description changes while a client writes: new clients are still
    served, during and after the old client's session (the image is not reopened)."""
    config = tmp_path / "c.toml"
    image = raw_image(tmp_path)
    config.write_text(f'[exports.d]\npath = "{image}"\ndescription = "first"\n')
    server = qcownbd_server("--config", config)
    old = NbdClient.connect(server.port, "d")
    assert old.write(0, b"x" * 512) == 0
    config.write_text(f'[exports.d]\npath = "{image}"\ndescription = "second"\n')
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "second" not in run(["nbdinfo", "--list", server.uri()], check=False).stdout:
        assert time.monotonic() < deadline, "the new description never showed"
        time.sleep(0.1)
    with NbdClient.connect(server.port, "d") as new:
        assert new.read(0, 512) == b"x" * 512
    old.close()
    time.sleep(0.3)
    assert first_byte(server.port, b"d") == b"x"
    assert server.stop() == 0
    assert "another process" not in server.stderr and "unavailable" not in server.stderr


def test_reload_that_reopens_a_busy_image_waits_for_its_clients(tmp_path, qcownbd_server):
    """read_only changes on an image a client writes to: that needs the image opened
    again, which its write lock forbids while the client is there; the export keeps
    serving as it was and takes the new settings once the client has left."""
    config = tmp_path / "c.toml"
    image = raw_image(tmp_path)
    config.write_text(f'[exports.d]\npath = "{image}"\n')
    server = qcownbd_server("--config", config)
    old = NbdClient.connect(server.port, "d")
    config.write_text(f'[exports.d]\npath = "{image}"\nread_only = true\n')
    server.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    with NbdClient.connect(server.port, "d") as meanwhile:
        assert not meanwhile.transmission_flags & READ_ONLY_FLAG
    old.close()
    deadline = time.monotonic() + 10
    while True:
        with NbdClient.connect(server.port, "d") as later:
            if later.transmission_flags & READ_ONLY_FLAG:
                break
        assert time.monotonic() < deadline, "the new settings never applied"
        time.sleep(0.2)
    assert server.stop() == 0 and "another process" not in server.stderr


def test_a_reload_with_bad_bytes_keeps_the_old_configuration(tmp_path, qcownbd_server):
    """A NUL in a path: the whole new config is refused in one log line; the exports
    that served go on, and the new valid one is not half-applied."""
    config = tmp_path / "c.toml"
    first, second = raw_image(tmp_path, "one", 0x31), raw_image(tmp_path, "two", 0x32)
    config.write_text(f'[exports.one]\npath = "{first}"\n')
    server = qcownbd_server("--config", config)
    for bad in ('path = "x\\u0000y"\n', None):
        text = f'[exports.two]\npath = "{second}"\n[exports.three]\n' + (bad or "")
        if bad is None:
            config.write_bytes(f'[exports.two]\npath = "{second}"\n'.encode() + b"# \xff\n")
        else:
            config.write_text(text)
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        assert can_connect(server, "one") and not can_connect(server, "two")
    assert server.stop() == 0
    assert "Traceback" not in server.stderr
    failures = [line for line in server.stderr.splitlines() if "reload failed" in line]
    assert len(failures) == 2 and "NUL byte" in failures[0] and "UTF-8" in failures[1]


def test_broken_config_export_is_refused_while_others_serve(tmp_path, qcownbd_server):
    config = tmp_path / "c.toml"
    config.write_text(f'[exports.good]\npath = "{raw_image(tmp_path)}"\n'
                      f'[exports.broken]\npath = "{tmp_path / "nothing.raw"}"\n')
    server = qcownbd_server("--config", config)
    assert can_connect(server, "good") and not can_connect(server, "broken")
    assert server.stop() == 0
    assert "nothing.raw" in server.stderr


def test_sighup_reload_adds_and_removes_exports(tmp_path, qcownbd_server):
    config = tmp_path / "c.toml"
    first, second = raw_image(tmp_path, "one", 0x31), raw_image(tmp_path, "two", 0x32)
    config.write_text(f'[exports.one]\npath = "{first}"\n')
    server = qcownbd_server("--config", config)
    old_client = NbdClient(server.port)
    old_client.go(b"one")
    config.write_text(f'[exports.two]\npath = "{second}"\n')
    server.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while not can_connect(server, "two"):
        assert time.monotonic() < deadline, "export two never appeared"
        time.sleep(0.1)
    assert not can_connect(server, "one")
    assert first_byte(server.port, b"two") == b"2"
    old_client.send(old_client.request(CMD_READ, 0, 1, 7))
    assert old_client.simple_reply() == (0, 7) and old_client.recv(1) == b"1"
    assert server.stop() == 0


@pytest.mark.timeout(120)
def test_reload_opens_a_large_image_while_clients_are_served(tmp_path, qcownbd_server):
    """Opening a 4 GiB fully mapped QCOW1 image read-write scans its tables (seconds):
    at SIGHUP that happens in a worker thread that leaves the GIL to the loop
    serving clients, whose READs stay fast meanwhile."""
    config = tmp_path / "c.toml"
    config.write_text(f'[exports.d]\npath = "{raw_image(tmp_path)}"\n')
    server = qcownbd_server("--config", config)
    big = tmp_path / "big.qcow"
    allocated_qcow1(big, 4 << 30, cluster_bits=12, l2_bits=9)
    client = NbdClient(server.port)
    client.go(b"d")
    latencies, reading = [], True

    def read_steadily():
        cookie = 0
        while reading:
            cookie += 1
            started = time.monotonic()
            client.send(client.request(CMD_READ, 0, 4096, cookie))
            assert client.simple_reply() == (0, cookie) and client.recv(4096) == b"B" * 4096
            latencies.append(time.monotonic() - started)

    reader = threading.Thread(target=read_steadily)
    reader.start()
    try:
        with open(config, "a") as file:
            file.write(f'[exports.big]\npath = "{big}"\n')
        started = time.monotonic()
        server.proc.send_signal(signal.SIGHUP)
        while not can_connect(server, "big"):
            assert time.monotonic() - started < 60, "export big never appeared"
        opened_after = time.monotonic() - started
    finally:
        reading = False
        reader.join()
    assert run(["nbdinfo", "--size", server.uri("big")]).stdout.strip() == str(4 << 30)
    worst = max(latencies)
    assert worst < opened_after / 8, f"a READ took {worst:.2f}s; opening took {opened_after:.2f}s"
    assert server.stop() == 0


def test_unix_socket(tmp_path):
    path = tmp_path / "nbd.sock"
    server = QcownbdServer("--unix", path, f"d={raw_image(tmp_path)}")
    try:
        out = run(["nbdinfo", "--size", f"nbd+unix:///d?socket={path}"]).stdout
        assert int(out) == SIZE
    finally:
        assert server.stop() == 0
    assert not path.exists()


def test_demo_creates_and_serves_a_qcow1_image(tmp_path, qcownbd_server):
    server = qcownbd_server("--demo", env={"XDG_DATA_HOME": str(tmp_path)})
    banner = run(["/usr/bin/python3", "-c",
                  "import nbd,sys; h=nbd.NBD(); h.connect_uri(sys.argv[1]); "
                  "sys.stdout.write(h.pread(17, 0).decode())", server.uri("demo")]).stdout
    assert banner == "qcownbd demo disk"
    assert server.stop() == 0
    image = tmp_path / "qcownbd" / "demo.qcow"
    info = run(["qemu-img", "info", "--output=json", image]).stdout
    assert '"format": "qcow"' in info and '"virtual-size": 67108864' in info


def test_metadata_is_committed_without_a_client_flush(tmp_path, qcownbd_server):
    image = tmp_path / "d.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", image, str(SIZE)])
    server = qcownbd_server(f"d={image}")
    client = NbdClient(server.port)
    client.go()
    client.send(client.request(CMD_WRITE, 3 << 20, 4096, 1, payload=b"\x5c" * 4096))
    assert client.simple_reply() == (0, 1)
    time.sleep(3.5)  # the commit timer runs every ~2 s
    server.proc.kill()
    server.proc.wait(10)
    run(["qemu-io", "-f", "qcow", "-c", "read -P 0x5c 3M 4k", image])
