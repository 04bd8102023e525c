"""Who may reach what: per-export client networks, names that are not paths,
backing files confined to directories, format pins, all through a real server.

Refusal is proven from 127.0.0.1 against networks that exclude it; no test
connects anywhere but 127.0.0.1 (or a Unix socket in its tmp dir).
"""

import pytest

from helpers import first_byte, qcownbd_cmd, run
from nbdclient import (ERR_UNKNOWN, OPT_EXPORT_NAME, OPT_GO, OPT_LIST, OPT_LIST_META, REP_ACK,
                       NbdClient, go_payload, meta_payload)
from qcownbd.config import parse_config
from qcownbd.errors import ConfigError

pytestmark = pytest.mark.timeout(60)
SIZE = 1024 * 1024


def _raw(tmp_path, name: str, fill: int) -> str:
    path = tmp_path / f"{name}.raw"
    path.write_bytes(bytes([fill]) * SIZE)
    return str(path)


@pytest.fixture
def fenced(tmp_path, qcownbd_server):
    """Exports open to all, to loopback, and to a network that excludes 127.0.0.1."""
    sock = tmp_path / "s.sock"
    config = tmp_path / "c.toml"
    config.write_text(
        f'[server]\nunix = "{sock}"\n'
        f'[exports.open]\npath = "{_raw(tmp_path, "open", 1)}"\n'
        f'[exports.loopback]\npath = "{_raw(tmp_path, "lo", 2)}"\n'
        f'allow = ["127.0.0.0/8", "::1/128"]\n'
        f'[exports.hidden]\npath = "{_raw(tmp_path, "hidden", 3)}"\n'
        f'allow = ["10.9.9.0/24", "fd00::/8"]\ndescription = "not for you"\n'
        f'[exports.tcp-only]\npath = "{_raw(tmp_path, "tcp", 4)}"\nallow_unix = false\n')
    server = qcownbd_server("--config", config)
    server.sock = sock
    return server


def _names(listing: str) -> set[str]:
    return {line.split('"')[1] for line in listing.splitlines() if line.startswith("export=")}


def test_export_outside_the_clients_networks_is_invisible_and_refused(fenced):
    listing = run(["nbdinfo", "--list", fenced.uri()]).stdout
    assert _names(listing) == {"open", "loopback", "tcp-only"}
    for export in ("open", "loopback"):
        assert "export-size: 1048576" in run(["nbdinfo", fenced.uri(export)]).stdout
    assert run(["nbdinfo", fenced.uri("hidden")], check=False).returncode != 0
    assert run(["qemu-img", "info", fenced.uri("hidden")], check=False).returncode != 0
    # the refusal says what a name that never existed says: nothing to probe with
    client = NbdClient(fenced.port)
    client.greet()
    for name in (b"hidden", b"nonexistent"):
        client.option(OPT_GO, go_payload(name))
        opt, rep, message = client.option_reply()
        assert (opt, rep) == (OPT_GO, ERR_UNKNOWN)
        assert message == f"no export named {name.decode()!r}".encode()
    client.option(OPT_LIST_META, meta_payload(b"hidden", [b"base:allocation"]))
    assert client.option_reply()[1] == ERR_UNKNOWN
    client.option(OPT_LIST)
    replies = []
    while (reply := client.option_reply())[1] != REP_ACK:
        replies.append(reply[2])
    assert not any(b"hidden" in data for data in replies)
    old_style = NbdClient(fenced.port)
    old_style.greet()
    old_style.option(OPT_EXPORT_NAME, b"hidden")
    assert old_style.closed()
    fenced.stop()
    assert "'hidden' refused by its allow list" in fenced.stderr


def test_unix_socket_clients_are_allowed_unless_the_export_says_no(fenced):
    def unix_uri(export):
        return f"nbd+unix:///{export}?socket={fenced.sock}"

    # no address to match: the socket file's permissions are the fence
    assert "export-size: 1048576" in run(["nbdinfo", unix_uri("hidden")]).stdout
    assert run(["nbdinfo", unix_uri("tcp-only")], check=False).returncode != 0
    assert "export-size: 1048576" in run(["nbdinfo", fenced.uri("tcp-only")]).stdout
    listing = run(["nbdinfo", "--list", unix_uri("")]).stdout
    assert _names(listing) == {"open", "loopback", "hidden"}


@pytest.mark.parametrize("name", ["/etc/passwd", "..", "a/../b", "../x", "a\x01b", "tab\there",
                                  "nul\0", "del\x7f"])
def test_export_names_that_look_like_paths_or_hold_controls_are_refused(name):
    with pytest.raises(ConfigError, match="bad export name"):
        parse_config({"exports": {name: {"path": "x"}}})


@pytest.mark.parametrize("name", ["vm1", "a..b", "team/vm-1", "ünïcode"])
def test_ordinary_export_names_load(name):
    assert name in parse_config({"exports": {name: {"path": "x"}}}).exports


@pytest.mark.parametrize("table, needle", [
    ({"allow": ["10.0.0.0/33"]}, "bad network"),
    ({"allow": ["10.0.0.1/8"]}, "bad network"),      # host bits set: a typo, not a network
    ({"allow": ["example.com"]}, "bad network"),
    ({"allow": "127.0.0.1"}, "allow has the wrong type"),
    ({"backing_dirs": [""]}, "backing_dirs"),
])
def test_bad_access_settings_name_the_key(table, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config({"exports": {"a": {"path": "x", **table}}})


def test_cli_export_names_are_checked_too(tmp_path):
    image = _raw(tmp_path, "d", 0)
    result = run(qcownbd_cmd("serve", "--listen", "127.0.0.1:1", f"..={image}"), check=False)
    assert result.returncode != 0 and "bad export name" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def chain(tmp_path):
    """A QCOW1 overlay in overlays/ whose backing file lives in bases/."""
    bases, overlays = tmp_path / "bases", tmp_path / "overlays"
    bases.mkdir()
    overlays.mkdir()
    base = bases / "base.raw"
    base.write_bytes(b"\x5b" * SIZE)
    overlay = overlays / "ov.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", "../bases/base.raw", "-F", "raw",
         overlay, str(SIZE)])
    # a symlink inside overlays/ pointing back out to bases/ must not pass as inside
    (overlays / "link.raw").symlink_to(base)
    sneaky = overlays / "sneaky.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", "link.raw", "-F", "raw",
         sneaky, str(SIZE)])
    return tmp_path


def _size(server, export: str) -> int:
    info = run(["nbdinfo", "--size", server.uri(export)]).stdout
    return int(info)


def test_backing_files_are_confined_to_the_configured_directories(chain, qcownbd_server):
    config = chain / "c.toml"
    config.write_text(
        '[server]\nbacking_dirs = ["overlays"]\n'
        '[exports.confined]\npath = "overlays/ov.qcow"\nformat = "qcow1"\n'
        '[exports.sneaky]\npath = "overlays/sneaky.qcow"\nformat = "qcow1"\n'
        '[exports.permitted]\npath = "overlays/ov.qcow"\nformat = "qcow1"\nread_only = true\n'
        'backing_dirs = ["bases"]\n')
    server = qcownbd_server("--config", config)
    for export in ("confined", "sneaky"):
        assert run(["nbdinfo", server.uri(export)], check=False).returncode != 0
    assert first_byte(server.port, "permitted") == b"\x5b"
    server.stop()
    assert server.stderr.count("is outside the allowed directories") == 2


def test_server_backing_dirs_apply_to_command_line_exports(chain, qcownbd_server):
    config = chain / "c.toml"
    config.write_text('[server]\nbacking_dirs = ["overlays"]\n')
    result = run(qcownbd_cmd("serve", "--listen", "127.0.0.1:1", "--config", config,
                             f"ov={chain / 'overlays' / 'ov.qcow'}"), check=False, timeout=30)
    assert result.returncode != 0 and "outside the allowed directories" in result.stderr
    server = qcownbd_server("--config", config, f"ok={chain / 'bases' / 'base.raw'}")
    assert first_byte(server.port, "ok") == b"\x5b"


def test_format_pins_hold_for_exports_and_their_backing_files(tmp_path, qcownbd_server):
    # a "raw disk" whose guest wrote a QCOW1 header, and an overlay backed by such a disk
    planted = tmp_path / "planted.raw"
    run(["qemu-img", "create", "-q", "-f", "qcow", planted, "64M"])
    overlay = tmp_path / "ov.qcow"
    run(["qemu-img", "create", "-q", "-f", "qcow", "-b", "planted.raw", "-F", "raw",
         overlay, str(SIZE)])
    config = tmp_path / "c.toml"
    config.write_text(
        f'[exports.pinned]\npath = "{planted}"\nformat = "raw"\nread_only = true\n'
        f'[exports.probed]\npath = "{planted}"\nread_only = true\n'
        f'[exports.ov-pinned]\npath = "{overlay}"\nformat = "qcow1"\nbacking_format = "raw"\n'
        f'read_only = true\n'
        f'[exports.ov-probed]\npath = "{overlay}"\nformat = "qcow1"\nread_only = true\n')
    server = qcownbd_server("--config", config)
    size = planted.stat().st_size
    assert _size(server, "pinned") == size
    assert _size(server, "probed") == 64 * 1024 * 1024
    assert first_byte(server.port, "pinned") == b"Q"
    assert first_byte(server.port, "ov-pinned") == b"Q"     # backing read as raw bytes
    assert first_byte(server.port, "ov-probed") == b"\0"    # backing taken as QCOW1


def test_fleet_members_are_fenced_before_any_overlay_is_made(tmp_path, qcownbd_server):
    golden = _raw(tmp_path, "golden", 7)
    overlays = tmp_path / "overlays"
    config = tmp_path / "c.toml"
    config.write_text(
        f'[exports.fleet]\ngolden = "{golden}"\ngolden_format = "raw"\n'
        f'overlay_dir = "{overlays}"\nallow = ["10.9.9.0/24"]\n')
    server = qcownbd_server("--config", config)
    client = NbdClient(server.port)
    client.greet()
    for name in (b"fleet/vm1", b"fleet/../../etc", b"fleet"):
        client.option(OPT_GO, go_payload(name))
        assert client.option_reply()[1:] == (
            ERR_UNKNOWN, f"no export named {name.decode()!r}".encode())
    assert not overlays.exists() or not any(overlays.rglob("*"))
