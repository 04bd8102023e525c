"""`qcownbd serve` as scripts and people used to qemu-nbd and nbdkit drive it (issue 14):
where it listens, the familiar flags, flags that meet a config file."""

import contextlib
import json
import os
import random
import signal
import socket
import subprocess

import pytest

from helpers import (
    free_port, listening_tcp_ports, qcownbd_cmd, qcownbd_env, raw_file, run, stop_process,
    wait_for,
)
from qcownbd.config import parse_listen

pytestmark = pytest.mark.timeout(120)
SIZE = 4 * 1024 * 1024
BANNER = b"qcownbd serve cli".ljust(512, b".")


@pytest.fixture
def image(tmp_path):
    """A raw image whose first sector is BANNER."""
    return raw_file(tmp_path / "disk.raw", BANNER, SIZE)


def serve_exits(*args, env=None, **kwargs) -> subprocess.CompletedProcess:
    """`qcownbd serve ARGS`, expected to exit by itself (``env``: more variables)."""
    return run(qcownbd_cmd("serve", *args), timeout=30, check=False,
               env=qcownbd_env(**(env or {})), **kwargs)


def accepts(where) -> bool:
    """Whether a Unix socket path or a (host, port) accepts connections now."""
    family = socket.AF_INET6 if isinstance(where, tuple) and ":" in where[0] else (
        socket.AF_INET if isinstance(where, tuple) else socket.AF_UNIX)
    with socket.socket(family) as sock:
        return sock.connect_ex(where if isinstance(where, tuple) else str(where)) == 0


@contextlib.contextmanager
def serving(*args, at, env=None):
    """`qcownbd serve ARGS` until the block ends, once it accepts ``at`` (a Unix socket
    path or (host, port)); it must then stop cleanly on SIGTERM."""
    proc = subprocess.Popen(qcownbd_cmd("serve", *args), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=qcownbd_env(**(env or {})))
    try:
        assert wait_for(lambda: proc.poll() is not None or accepts(at), 20)
        assert proc.poll() is None, proc.stderr.read()
        yield proc
    finally:
        status = stop_process(proc)
        log = proc.stderr.read()
        proc.stderr.close()
    assert status == 0, log


def nbdinfo_json(uri: str) -> dict:
    """`nbdinfo --json URI`: the first export's facts."""
    return json.loads(run(["nbdinfo", "--json", uri], timeout=30).stdout)["exports"][0]


def one_line_error(result: subprocess.CompletedProcess, status: int) -> str:
    """The single stderr line of a refused start, checked for ``status`` and no traceback."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == status and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# -- 4. listen on exactly what was asked ------------------------------------------------

def test_unix_alone_binds_no_tcp_and_two_unix_servers_run_side_by_side(tmp_path, image):
    first, second = tmp_path / "a.sock", tmp_path / "b.sock"
    with serving("--unix", first, "--read-only", f"d={image}", at=first) as one, \
            serving("--unix", second, "--read-only", f"d={image}", at=second) as two:
        assert listening_tcp_ports(one.pid) == set() == listening_tcp_ports(two.pid)
        for path in (first, second):
            size = run(["nbdinfo", "--size", f"nbd+unix:///d?socket={path}"]).stdout
            assert int(size) == SIZE


@pytest.mark.parametrize("server_table", ["listen = []\n", ""])
def test_config_with_a_unix_socket_and_no_listen_binds_no_tcp(tmp_path, image, server_table):
    sock = tmp_path / "nbd.sock"
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\n{server_table}unix = "{sock}"\n'
                      f'[exports.d]\npath = "{image}"\n')
    with serving("--config", config, at=sock) as proc:
        assert listening_tcp_ports(proc.pid) == set()
        assert int(run(["nbdinfo", "--size", f"nbd+unix:///d?socket={sock}"]).stdout) == SIZE


def test_an_empty_listen_list_alone_is_one_line(tmp_path, image):
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nlisten = []\n[exports.d]\npath = "{image}"\n')
    assert "nowhere to listen" in one_line_error(serve_exits("--config", config), 1)


# -- 7. --listen HOST, :PORT, PORT; a port in use --------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1", ("127.0.0.1", 10809)),
    (":10810", ("127.0.0.1", 10810)),
    ("10810", ("127.0.0.1", 10810)),
    ("[::1]", ("::1", 10809)),
    ("localhost", ("localhost", 10809)),
])
def test_listen_fills_in_the_default_address_and_port(text, expected):
    assert parse_listen(text) == expected


@pytest.mark.parametrize("form, host", [
    ("-p {port}", "127.0.0.1"),
    ("--listen 127.0.0.1 -p {port}", "127.0.0.1"),
    ("--listen :{port}", "127.0.0.1"),
    ("--listen {port}", "127.0.0.1"),
    ("--listen [::1] -p {port}", "::1"),
])
def test_listen_forms_serve_real_clients(image, form, host):
    port = free_port()
    with serving(*form.format(port=port).split(), f"d={image}", at=(host, port)) as proc:
        assert listening_tcp_ports(proc.pid) == {port}
        shown = f"[{host}]" if ":" in host else host
        assert nbdinfo_json(f"nbd://{shown}:{port}/d")["export-size"] == SIZE


def test_a_port_in_use_is_named_and_listen_suggested(image):
    port = free_port()
    with serving("--listen", f"127.0.0.1:{port}", "--read-only", f"d={image}",
                 at=("127.0.0.1", port)):
        line = one_line_error(serve_exits("--listen", f"127.0.0.1:{port}", "--read-only",
                                          f"e={image}", "-q"), 1)
    assert f"127.0.0.1:{port}" in line and "--listen" in line


# -- 6. --read-only and --format with --config: never ignored ----------------------------

def test_read_only_applies_to_config_exports_and_format_to_the_command_lines(tmp_path):
    qcow, other = tmp_path / "disk.qcow", tmp_path / "other.qcow"
    for path in (qcow, other):
        run(["qemu-img", "create", "-q", "-f", "qcow", path, "64M"])
    port = free_port()
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n'
                      f'[exports.c]\npath = "{other}"\n')
    before = other.read_bytes()
    with serving("--config", config, "--read-only", "--format", "raw", f"q={qcow}",
                 at=("127.0.0.1", port)):
        from_config = nbdinfo_json(f"nbd://127.0.0.1:{port}/c")
        assert from_config["is_read_only"] is True and from_config["export-size"] == 64 << 20
        write = run(["qemu-io", "-f", "raw", "-c", "write -P 7 0 4k",
                     f"nbd://127.0.0.1:{port}/c"], check=False)
        assert write.returncode == 1 and "Permission denied" in write.stderr
        # --format pins the command-line image only: its QCOW1 bytes served raw
        from_cli = nbdinfo_json(f"nbd://127.0.0.1:{port}/q")
        assert from_cli["is_read_only"] is True
        assert from_cli["export-size"] == qcow.stat().st_size
    assert other.read_bytes() == before


@pytest.mark.parametrize("flag", [["--format", "raw"], ["-x", "name"], ["-D", "text"],
                                  ["-s"]])
def test_image_flags_without_command_line_images_are_refused(tmp_path, image, flag):
    config = tmp_path / "c.toml"
    config.write_text(f'[server]\nlisten = ["127.0.0.1:{free_port()}"]\n'
                      f'[exports.c]\npath = "{image}"\n')
    line = one_line_error(serve_exits("--config", config, *flag), 2)
    assert flag[0] in line and "shape(s) the command-line images" in line


# -- 8. -r, -p, -x, -D ---------------------------------------------------------------------

def test_export_name_description_and_short_read_only(image):
    port = free_port()
    with serving("-p", port, "-r", "-x", "disk0", "-D", "the first disk", image,
                 at=("127.0.0.1", port)):
        listing = run(["nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{port}"]).stdout
        (export,) = json.loads(listing)["exports"]
        assert export["export-name"] == "disk0" and export["description"] == "the first disk"
        assert export["is_read_only"] is True


def test_export_name_needs_exactly_one_path(image):
    for args in (["-x", "a", image, image], ["-x", "a", f"b={image}"]):
        assert "names the one command-line image" in one_line_error(serve_exits(*args), 2)


# -- 1. --run: nbdkit's captive mode ------------------------------------------------------

VARIABLES = 'printf "%s\\n" "$uri" "$nbd" "$port" "$unixsocket" "$exportname"'


def test_run_sets_nbdkits_variables_and_exits_with_the_commands_status(image):
    port = free_port()
    result = serve_exits("-p", port, "-x", "disk 1", image, "-q",
                         "--run", f'{VARIABLES}; nbdinfo --size "$uri"; exit 3')
    assert result.returncode == 3, result.stderr
    uri = f"nbd://127.0.0.1:{port}/disk%201"
    assert result.stdout.splitlines() == [uri, uri, str(port), "", "disk 1", str(SIZE)]


def test_run_over_a_unix_socket(tmp_path, image):
    sock = tmp_path / "nbd.sock"
    result = serve_exits("--unix", sock, f"d={image}", "-q",
                         "--run", f'{VARIABLES}; nbdinfo --size "$uri"')
    assert result.returncode == 0, result.stderr
    uri = f"nbd+unix:///d?socket={sock}"
    assert result.stdout.splitlines() == [uri, uri, "", str(sock), "d", str(SIZE)]
    assert not sock.exists()


def test_run_stops_with_the_writes_committed(tmp_path):
    qcow = tmp_path / "disk.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", qcow, "16M"])
    result = serve_exits("-p", free_port(), qcow,
                         "--run", 'qemu-io -f raw -c "write -P 0x5a 1M 3M" "$uri"')
    assert result.returncode == 0, result.stderr
    assert "stopping" in result.stderr
    run(["qemu-io", "-f", "qcow", "-r", "-c", "read -P 0x5a 1M 3M", "-c", "read -P 0 0 1M",
         qcow])
    assert run(qcownbd_cmd("check", qcow), env=qcownbd_env()).returncode == 0


def test_a_signal_ends_the_run_command_too(image):
    port = free_port()
    proc = subprocess.Popen(qcownbd_cmd("serve", "-p", port, "-r", image,
                                        "--run", "sleep 60"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=qcownbd_env())
    try:
        assert wait_for(lambda: accepts(("127.0.0.1", port)), 20)
        proc.terminate()
        assert proc.wait(30) == 128 + 15      # sleep's status: killed by SIGTERM
    finally:
        stop_process(proc)
        proc.stderr.close()


def test_run_and_fork_do_not_mix(image):
    line = one_line_error(serve_exits("--fork", "--run", "true", image), 2)
    assert "foreground: drop --fork" in line


# -- 2 and 3. --pid-file and --fork ---------------------------------------------------------

def test_pid_file_is_written_once_listening_and_removed_at_exit(tmp_path, image):
    pid_file, port = tmp_path / "qcownbd.pid", free_port()
    proc = subprocess.Popen(qcownbd_cmd("serve", "-p", port, "--pid-file", pid_file, image),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=qcownbd_env())
    try:
        assert wait_for(pid_file.exists, 20), "no pid file"
        # the moment it exists, the server accepts: no retry loop needed
        assert accepts(("127.0.0.1", port))
        assert pid_file.read_text() == f"{proc.pid}\n"
    finally:
        assert stop_process(proc) == 0
    assert not pid_file.exists()


def test_fork_returns_once_listening_and_logs_on(tmp_path, image):
    pid_file, log, port = tmp_path / "qcownbd.pid", tmp_path / "log", free_port()
    with open(log, "w") as stderr:
        # capture_output would hang if the daemon kept a pipe; stderr goes to a file here
        parent = subprocess.run(
            qcownbd_cmd("serve", "--fork", "-p", port, "--pid-file", pid_file, image),
            timeout=30, env=qcownbd_env(), stderr=stderr, stdout=subprocess.PIPE, check=True)
    assert parent.stdout == b""
    pid = int(pid_file.read_text())
    try:
        copy = run(["nbdcopy", f"nbd://127.0.0.1:{port}", "-"], timeout=30).stdout
        assert copy.startswith(BANNER.decode())
        assert wait_for(lambda: "closed export=disk" in log.read_text())
    finally:
        os.kill(pid, signal.SIGTERM)
        assert wait_for(lambda: not pid_file.exists(), 30), "the daemon did not stop"
    assert "stopping" in log.read_text()


def test_fork_with_output_captured_still_returns(tmp_path, image):
    port = free_port()
    pid_file = tmp_path / "pid"
    parent = run(qcownbd_cmd("serve", "--fork", "-p", port, "--pid-file", pid_file, "-r", image),
                 timeout=30, env=qcownbd_env())
    try:
        assert f"listening on 127.0.0.1:{port}" in parent.stderr
        assert "stderr is a pipe" in parent.stderr
        assert int(run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}"]).stdout) == SIZE
    finally:
        os.kill(int(pid_file.read_text()), signal.SIGTERM)
        assert wait_for(lambda: not pid_file.exists(), 30)


def test_fork_reports_the_childs_error(image):
    port = free_port()
    with serving("-p", port, "-r", image, at=("127.0.0.1", port)):
        result = serve_exits("--fork", "-q", "-p", port, "-r", image)
    assert f"127.0.0.1:{port}" in one_line_error(result, 1)


# -- 5. one connection handed over on standard input ----------------------------------

def libnbd(script: str, *args) -> subprocess.CompletedProcess:
    """Run ``script`` with libnbd's Python module (sys.argv[1:] = ``args``)."""
    return run(["/usr/bin/python3", "-c", "import nbd, sys\n" + script, *args], timeout=60,
               env=qcownbd_env())


def test_stdin_serves_one_connection_from_a_socketpair(image):
    script = ("h = nbd.NBD()\n"
              "h.connect_command(sys.argv[1:])\n"
              "h.pwrite(b'handed over', 4096)\n"
              "h.flush()\n"
              "print(h.get_size(), h.pread(11, 4096).decode(), h.is_read_only())\n"
              "h.shutdown()\n")
    out = libnbd(script, *qcownbd_cmd("serve", "--stdin", image)).stdout
    assert out.split() == [str(SIZE), "handed", "over", "False"]
    with open(image, "rb") as disk:
        disk.seek(4096)
        assert disk.read(11) == b"handed over"


def test_stdin_with_stderr_on_the_same_socket_keeps_the_log_off_it(image):
    # inetd hands the socket over as stdin, stdout and stderr alike
    script = ("import socket, subprocess\n"
              "ours, theirs = socket.socketpair()\n"
              "proc = subprocess.Popen(sys.argv[1:], stdin=theirs, stdout=theirs, "
              "stderr=theirs)\n"
              "theirs.close()\n"
              "h = nbd.NBD()\n"
              "h.connect_socket(ours.detach())\n"
              "print(h.pread(17, 0).decode())\n"
              "h.shutdown()\n"
              "print(proc.wait(30))\n")
    out = libnbd(script, *qcownbd_cmd("serve", "--stdin", "-v", image)).stdout
    assert out.splitlines() == [BANNER[:17].decode(), "0"]


def activate(*options, serve_args) -> subprocess.Popen:
    """`systemd-socket-activate OPTIONS -l 127.0.0.1:PORT qcownbd serve ARGS`, listening."""
    port = free_port()
    proc = subprocess.Popen(["systemd-socket-activate", *options, "-l", f"127.0.0.1:{port}",
                             "-E", f"PYTHONPATH={qcownbd_env()['PYTHONPATH']}",
                             *qcownbd_cmd("serve", *serve_args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert "Listening on" in line, line
    proc.port = port
    return proc


@pytest.mark.parametrize("options, serve_args", [
    (["--inetd", "--accept"], ["--stdin"]),      # inetd: the connection on stdin
    (["--accept"], []),                          # Accept=yes: connected fd 3, LISTEN_FDS=1
])
def test_an_instance_per_connection(image, options, serve_args):
    proc = activate(*options, serve_args=[*serve_args, "-r", image])
    try:
        for _client in range(2):
            uri = f"nbd://127.0.0.1:{proc.port}"
            assert int(run(["nbdinfo", "--size", uri], timeout=30).stdout) == SIZE
            read = run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x2e 17 495", uri],
                       timeout=30)
            assert "read 495/495 bytes" in read.stdout
        # each instance ended with its connection
        assert wait_for(lambda: not _children(proc.pid), 20)
    finally:
        stop_process(proc)
        proc.stderr.close()


def _children(pid: int) -> list[str]:
    """The pids of the live children of ``pid``."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return children.read().split()


def test_stdin_that_is_not_a_socket_is_one_line(image):
    line = one_line_error(serve_exits("--stdin", image, stdin=subprocess.DEVNULL), 2)
    assert "not a socket" in line
    line = one_line_error(serve_exits("--stdin", "--listen", "1", image), 2)
    assert "without listening: drop --listen" in line


# -- 8. -s/--snapshot: throw-away writes -------------------------------------------------

def open_mode(pid: int, path) -> int:
    """The access mode (os.O_RDONLY...) of the process's descriptor of ``path``."""
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if os.path.realpath(f"/proc/{pid}/fd/{fd}") == os.path.realpath(path):
            with open(f"/proc/{pid}/fdinfo/{fd}") as info:
                flags = next(line for line in info if line.startswith("flags:"))
            return int(flags.split()[1], 8) & os.O_ACCMODE
    raise AssertionError(f"{path} is not open")


def test_snapshot_throws_writes_away_and_leaves_nothing_behind(tmp_path, image):
    temp, port = tmp_path / "tmp", free_port()
    temp.mkdir()
    before = image.read_bytes()
    uri = f"nbd://127.0.0.1:{port}/disk"
    with serving("-s", "-p", port, image, at=("127.0.0.1", port),
                 env={"TMPDIR": str(temp)}) as proc:
        assert open_mode(proc.pid, image) == os.O_RDONLY
        (overlay_dir,) = temp.iterdir()
        assert overlay_dir.stat().st_mode & 0o777 == 0o700
        assert nbdinfo_json(uri)["is_read_only"] is False
        run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", uri])
        # the writes are there for every client until the server stops...
        run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x5a 0 1M", uri])
        # ...and the image is not held for writing: QEMU may read it meanwhile
        run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x2e 17 495", image])
    assert image.read_bytes() == before
    assert list(temp.iterdir()) == []


def test_snapshot_of_a_qcow1_image_with_a_pinned_format(tmp_path):
    qcow = tmp_path / "disk.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", qcow, "8M"])
    run(["qemu-io", "-f", "qcow", "-c", "write -P 0x11 0 2M", qcow])
    before = qcow.read_bytes()
    result = serve_exits("-s", "--format", "qcow1", "-p", free_port(), qcow, "--run",
                         'qemu-io -f raw -c "read -P 0x11 0 2M" -c "write -P 0x22 1M 2M" '
                         '-c "read -P 0x11 0 1M" -c "read -P 0x22 1M 2M" "$uri"',
                         env={"TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("read ") == 3 and "Pattern verification failed" \
        not in result.stdout
    assert qcow.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["disk.qcow"]



# -- 8. --offset/--size and --partition: one part of a disk ------------------------------

MiB = 1 << 20


def partitioned_disk(tmp_path, table: str) -> tuple:
    """A raw disk with partitions 1 (1 MiB) and 2 (3 MiB) of random bytes, laid out by
    nbdkit's partitioning plugin (an MBR or a GPT): (disk, first, second)."""
    parts = []
    for number, size in ((1, MiB), (2, 3 * MiB)):
        part = tmp_path / f"part{number}"
        part.write_bytes(random.Random(number).randbytes(size))
        parts.append(part)
    disk = tmp_path / f"{table}.raw"
    run(["nbdkit", "-U", "-", "partitioning", *(f"file={part}" for part in parts),
         f"partition-type={table}", "--run", f'nbdcopy "$uri" {disk}'])
    return disk, *parts


def binary_output(cmd, env=None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (bounded, output captured as bytes); it must exit 0."""
    result = subprocess.run([str(arg) for arg in cmd], capture_output=True, timeout=60,
                            env=env)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result


def nbdkit_partition(disk, number: int) -> bytes:
    """What nbdkit's partition filter serves as partition ``number`` of ``disk``."""
    return binary_output(["nbdkit", "-U", "-", "--filter=partition", "file", disk,
                          f"partition={number}", "--run", 'nbdcopy "$uri" -']).stdout


@pytest.mark.parametrize("table", ["mbr", "gpt"])
def test_partition_serves_what_nbdkit_does(tmp_path, table):
    disk, first, second = partitioned_disk(tmp_path, table)
    for number, part in ((1, first), (2, second)):
        served = binary_output(qcownbd_cmd("serve", "-q", "-r", "-p", free_port(),
                                           "--partition", number, disk,
                                           "--run", 'nbdcopy "$uri" -'), qcownbd_env()).stdout
        assert served == part.read_bytes() == nbdkit_partition(disk, number)


@pytest.mark.parametrize("table", ["mbr", "gpt"])
def test_writes_zeroes_and_trims_land_inside_the_partition(tmp_path, table):
    disk, _first, second = partitioned_disk(tmp_path, table)
    before = disk.read_bytes()
    start = before.index(second.read_bytes())
    end = start + 3 * MiB
    commands = ["write -P 0xaa 0 64k", "write -P 0xbb 3008k 64k", "write -z 128k 64k",
                "discard 256k 64k"]
    result = serve_exits("-q", "-p", free_port(), "--partition", 2, disk, "--run",
                         "qemu-io -f raw -d unmap " + " ".join(f'-c "{c}"' for c in commands)
                         + ' "$uri"')
    assert result.returncode == 0, result.stdout + result.stderr
    after = disk.read_bytes()
    assert after[:start] == before[:start] and after[end:] == before[end:]
    inside = after[start:end]
    assert inside[:64 << 10] == b"\xaa" * (64 << 10)
    assert inside[-(64 << 10):] == b"\xbb" * (64 << 10)
    assert inside[128 << 10:192 << 10] == bytes(64 << 10) == inside[256 << 10:320 << 10]
    for untouched in (slice(64 << 10, 128 << 10), slice(192 << 10, 256 << 10),
                      slice(320 << 10, 3008 << 10)):
        assert inside[untouched] == second.read_bytes()[untouched]


def test_offset_and_size_shift_reads_and_block_status(tmp_path):
    disk = tmp_path / "disk.raw"
    data = random.Random(7).randbytes(MiB)
    with open(disk, "wb") as file:
        file.truncate(8 * MiB)
        file.seek(2 * MiB)
        file.write(data)
        file.seek(5 * MiB)
        file.write(data[:64 << 10])
    served = binary_output(qcownbd_cmd(
        "serve", "-q", "-r", "-p", free_port(), "--offset", "1M", "--size", "6M", disk,
        "--run", 'nbdinfo --size "$uri"; nbdinfo --map "$uri"; nbdcopy "$uri" -'),
        qcownbd_env())
    size, *extents = served.stdout[:-6 * MiB].decode().splitlines()
    assert int(size) == 6 * MiB
    starts = [(int(line.split()[0]), "hole" in line) for line in extents]
    assert starts == [(0, True), (MiB, False), (2 * MiB, True), (4 * MiB, False),
                      (4 * MiB + (64 << 10), True)]
    # large reads go out by sendfile, from the shifted file offset
    assert served.stdout[-6 * MiB:] == disk.read_bytes()[MiB:7 * MiB]


def test_a_window_of_a_qcow1_image_with_qemu_io(tmp_path):
    qcow = tmp_path / "disk.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", qcow, "16M"])
    result = serve_exits("-q", "-p", free_port(), "--offset", "4M", "--size", "8M", qcow,
                         "--run", 'nbdinfo --size "$uri"; qemu-io -f raw '
                                  '-c "write -P 0x33 0 1M" -c "write -P 0x44 7M 1M" "$uri"')
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == str(8 * MiB)
    run(["qemu-io", "-f", "qcow", "-r", "-c", "read -P 0 0 4M", "-c", "read -P 0x33 4M 1M",
         "-c", "read -P 0x44 11M 1M", "-c", "read -P 0 12M 4M", qcow])


@pytest.mark.parametrize("args, needle", [
    (["--offset", "4M"], "past the end"),
    (["--offset", "1M", "--size", "4M"], "does not fit"),
    (["--partition", "1"], "no partition table"),
])
def test_windows_that_do_not_fit_are_one_line(image, args, needle):
    assert needle in one_line_error(serve_exits("-q", "-p", free_port(), *args, image), 1)


@pytest.mark.parametrize("table, number, needle", [
    ("mbr", 3, "unused"), ("mbr", 5, "1 to 4"), ("gpt", 3, "unused"),
])
def test_missing_partitions_are_one_line(tmp_path, table, number, needle):
    disk, *_parts = partitioned_disk(tmp_path, table)
    result = serve_exits("-q", "-r", "-p", free_port(), "--partition", number, disk)
    assert needle in one_line_error(result, 1)


def test_partition_and_offset_do_not_mix(image):
    line = one_line_error(serve_exits("--partition", "1", "--offset", "1M", image), 2)
    assert "drop --offset and --size" in line
