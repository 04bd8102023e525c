"""NBD_OPT_STARTTLS: x509 certificates made here with openssl, real TLS clients.

QEMU (GnuTLS, `--object tls-creds-x509`) and libnbd (`nbds://`, GnuTLS) talk
to the server; a raw-socket client with Python's ssl checks what polite
clients never try (options before TLS, STARTTLS twice, bytes smuggled in
ahead of the TLS handshake, state surviving the restart).
"""

import os
import signal
import ssl
import time
from types import SimpleNamespace

import pytest

from helpers import qcownbd_cmd, qcownbd_env, run, wait_for
from nbdclient import (CMD_READ, ERR_INVALID, ERR_POLICY, ERR_TLS_REQD, OPT_ABORT,
                       OPT_EXPORT_NAME, OPT_GO, OPT_LIST, OPT_STARTTLS, OPT_STRUCTURED, REP_ACK,
                       NbdClient, go_payload, option)
from qcownbd.config import parse_config
from qcownbd.errors import ConfigError

pytestmark = pytest.mark.timeout(90)
SIZE = 8 * 1024 * 1024


def _openssl(*args, cwd):
    run(["openssl", *args], timeout=30, cwd=cwd)


def _make_ca(name: str, cwd) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}-key.pem", "-out", f"{name}-cert.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=cwd)


def _make_leaf(name: str, ca: str, usage: str, san: str, cwd) -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}-key.pem", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=cwd)
    (cwd / f"{name}.ext").write_text(
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        f"extendedKeyUsage={usage}\n{san}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey",
             f"{ca}-key.pem", "-CAcreateserial", "-out", f"{name}-cert.pem", "-days", "2",
             "-extfile", f"{name}.ext", cwd=cwd)


def _client_dir(pki, name: str, ca_files: tuple[str, ...], cert: str | None):
    """A directory laid out as QEMU and libnbd want it: ca-cert.pem (+ client cert/key)."""
    path = pki / name
    path.mkdir()
    (path / "ca-cert.pem").write_text("".join((pki / f).read_text() for f in ca_files))
    if cert:
        (path / "client-cert.pem").write_text((pki / f"{cert}-cert.pem").read_text())
        (path / "client-key.pem").write_text((pki / f"{cert}-key.pem").read_text())
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server cert for 127.0.0.1/localhost, client certs from it and from a rogue CA."""
    pki = tmp_path_factory.mktemp("pki")
    _make_ca("ca", pki)
    _make_ca("rogue", pki)
    _make_leaf("server", "ca", "serverAuth", "subjectAltName=IP:127.0.0.1,DNS:localhost", pki)
    _make_leaf("client", "ca", "clientAuth", "", pki)
    _make_leaf("neighbour", "ca", "clientAuth", "", pki)
    _make_leaf("intruder", "rogue", "clientAuth", "", pki)
    return SimpleNamespace(
        root=pki, good=_client_dir(pki, "good", ("ca-cert.pem",), "client"),
        neighbour=_client_dir(pki, "neighbour", ("ca-cert.pem",), "neighbour"),
        # QEMU checks its own certificate against the dir's CA file: give it both CAs
        rogue=_client_dir(pki, "rogue", ("ca-cert.pem", "rogue-cert.pem"), "intruder"),
        nocert=_client_dir(pki, "nocert", ("ca-cert.pem",), None),
        untrusting=_client_dir(pki, "untrusting", ("rogue-cert.pem",), "client"))


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "d.raw"
    run(["qemu-img", "create", "-q", "-f", "raw", path, str(SIZE)])
    return path


def tls_args(pki, mode: str, verify: bool = True) -> list:
    args = ["--tls", mode, "--tls-cert", pki.root / "server-cert.pem",
            "--tls-key", pki.root / "server-key.pem"]
    return args + (["--tls-ca", pki.root / "ca-cert.pem"] if verify else [])


def nbds(server, export: str, certs) -> str:
    return f"nbds://127.0.0.1:{server.port}/{export}?tls-certificates={certs}"


def qemu_tls(server, export: str, certs) -> list[str]:
    """qemu-img/qemu-io arguments opening an export over TLS with the certs in ``certs``."""
    return ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={certs}", "--image-opts",
            f"driver=nbd,host=127.0.0.1,port={server.port},export={export},tls-creds=tls0"]


def test_data_round_trips_byte_exact_over_tls_with_client_certificates(
        pki, image, tmp_path, qcownbd_server):
    server = qcownbd_server(*tls_args(pki, "require"), f"d={image}")
    source = tmp_path / "source.bin"
    source.write_bytes(os.urandom(SIZE // 2) + bytes(SIZE // 4) + os.urandom(SIZE // 4))
    run(["nbdcopy", source, nbds(server, "d", pki.good)], timeout=60)
    *tls_object, _opts, nbd_spec = qemu_tls(server, "d", pki.good)
    run(["qemu-img", "compare", *tls_object, "--image-opts",
         f"driver=raw,file.driver=file,file.filename={source}", nbd_spec], timeout=60)
    run(["qemu-io", *qemu_tls(server, "d", pki.good), "-c", "write -P 0x5a 4096 8192"])
    out = tmp_path / "out.bin"
    run(["nbdcopy", nbds(server, "d", pki.good), out], timeout=60)
    expected = bytearray(source.read_bytes())
    expected[4096:4096 + 8192] = b"\x5a" * 8192
    assert out.read_bytes() == expected
    assert image.read_bytes() == expected
    info = run(["nbdinfo", nbds(server, "d", pki.good)]).stdout
    assert "with TLS" in info
    server.stop()
    assert "client client" in server.stderr       # the log names the authenticated client


def test_require_refuses_plain_clients_before_tls(pki, image, qcownbd_server):
    server = qcownbd_server(*tls_args(pki, "require"), f"d={image}")
    for cmd in (["nbdinfo", server.uri("d")], ["nbdinfo", "--list", server.uri()],
                ["qemu-img", "info", server.uri("d")]):
        result = run(cmd, check=False, timeout=30)
        assert result.returncode != 0, cmd
    client = NbdClient(server.port)
    client.greet()
    for opt, data in ((OPT_LIST, b""), (OPT_STRUCTURED, b""), (OPT_GO, go_payload("d")),
                      (99, b"")):
        client.option(opt, data)
        assert client.option_reply()[:2] == (opt, ERR_TLS_REQD)
    client.option(OPT_ABORT)
    assert client.option_reply()[1] == REP_ACK
    assert client.closed()
    old_style = NbdClient(server.port)
    old_style.greet()
    old_style.option(OPT_EXPORT_NAME, b"d")
    assert old_style.closed()


def test_client_certificates_are_verified(pki, image, qcownbd_server):
    server = qcownbd_server(*tls_args(pki, "require"), f"d={image}")
    for certs in (pki.rogue, pki.nocert):
        result = run(["nbdinfo", nbds(server, "d", certs)], check=False, timeout=30)
        assert result.returncode != 0, certs
    result = run(["qemu-img", "info", *qemu_tls(server, "d", pki.rogue)], check=False,
                 timeout=30)
    assert result.returncode != 0
    # and the client checks the server: a client trusting only the rogue CA refuses it
    result = run(["nbdinfo", nbds(server, "d", pki.untrusting)], check=False, timeout=30)
    assert result.returncode != 0
    run(["nbdinfo", nbds(server, "d", pki.good)], timeout=30)
    server.stop()
    assert "CERTIFICATE_VERIFY_FAILED" in server.stderr
    assert "Traceback" not in server.stderr


def test_tls_on_serves_plain_and_tls_clients_without_client_certs(pki, image, qcownbd_server):
    server = qcownbd_server(*tls_args(pki, "on", verify=False), f"d={image}")
    plain = run(["nbdinfo", server.uri("d")]).stdout
    assert "without TLS" in plain
    secure = run(["nbdinfo", nbds(server, "d", pki.nocert)]).stdout
    assert "with TLS" in secure
    run(["qemu-io", *qemu_tls(server, "d", pki.nocert), "-c", "write -P 7 0 512",
         "-c", "read -P 7 0 512"])


def _trusted_by(server, certs) -> bool:
    """Whether an nbds:// client trusting the CA in ``certs`` completes the handshake."""
    return run(["nbdinfo", "--size", nbds(server, "d", certs)], timeout=30,
               check=False).returncode == 0


def test_sighup_rereads_the_certificate_files(pki, image, tmp_path, qcownbd_server):
    """Certificates rotate by replacing the files and sending SIGHUP; a broken
    replacement is refused with one log line and the old certificate stays."""
    _make_leaf("rotated", "rogue", "serverAuth", "subjectAltName=IP:127.0.0.1", pki.root)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes((pki.root / "server-cert.pem").read_bytes())
    key.write_bytes((pki.root / "server-key.pem").read_bytes())
    server = qcownbd_server("--tls", "on", "--tls-cert", cert, "--tls-key", key, f"d={image}")
    assert _trusted_by(server, pki.nocert) and not _trusted_by(server, pki.untrusting)
    cert.write_bytes((pki.root / "rotated-cert.pem").read_bytes())
    key.write_bytes((pki.root / "rotated-key.pem").read_bytes())
    server.proc.send_signal(signal.SIGHUP)
    assert wait_for(lambda: _trusted_by(server, pki.untrusting))
    assert not _trusted_by(server, pki.nocert)
    key.write_text("not a key\n")
    server.proc.send_signal(signal.SIGHUP)
    time.sleep(1)
    assert _trusted_by(server, pki.untrusting)
    assert server.stop() == 0
    assert "TLS reload failed, keeping the old certificate" in server.stderr
    assert "Traceback" not in server.stderr


def _client_ssl(pki) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.root / "ca-cert.pem"))
    context.load_cert_chain(str(pki.root / "client-cert.pem"), str(pki.root / "client-key.pem"))
    return context


def test_negotiation_restarts_after_starttls(pki, image, qcownbd_server):
    server = qcownbd_server(*tls_args(pki, "on"), f"d={image}")
    client = NbdClient(server.port)
    client.greet(flags=3)
    # agreed in clear text, so it must not hold once TLS is up
    client.option(OPT_STRUCTURED)
    assert client.option_reply()[1] == REP_ACK
    client.option(OPT_STARTTLS)
    assert client.option_reply()[:2] == (OPT_STARTTLS, REP_ACK)
    client.sock = _client_ssl(pki).wrap_socket(client.sock, server_hostname="127.0.0.1")
    client.option(OPT_STARTTLS)
    assert client.option_reply()[:2] == (OPT_STARTTLS, ERR_INVALID)
    client.option(OPT_GO, go_payload("d"))
    while client.option_reply()[1] != REP_ACK:
        pass
    client.send(client.request(CMD_READ, 0, 16, 7))
    assert client.simple_reply() == (0, 7)        # a simple reply: structured was forgotten
    assert client.recv(16) == bytes(16)


def test_bytes_sent_ahead_of_the_tls_handshake_end_the_connection(pki, image, qcownbd_server):
    server = qcownbd_server(*tls_args(pki, "require"), f"d={image}")
    client = NbdClient(server.port)
    client.greet()
    # a STARTTLS injection: plain-text options queued behind STARTTLS must not
    # be taken as if they had come through TLS
    client.send(option(OPT_STARTTLS), option(OPT_GO, go_payload("d")))
    assert client.closed()
    server.stop()
    assert "data after STARTTLS" in server.stderr


def test_fleet_tenant_by_certificate(pki, image, tmp_path, qcownbd_server):
    """tenant = "certificate": the overlay belongs to the certificate that made it; another
    certificate of the same CA is told the overlay does not exist."""
    config = tmp_path / "fleet.toml"
    config.write_text(f'[exports.fleet]\ngolden = "{image}"\ngolden_format = "raw"\n'
                      f'overlay_dir = "{tmp_path / "overlays"}"\ntenant = "certificate"\n')
    server = qcownbd_server("--config", config, *tls_args(pki, "require"))
    run(["nbdinfo", nbds(server, "fleet/vm1", pki.good)], timeout=30)
    assert (tmp_path / "overlays" / "vm1.owner").read_text().strip() == "client"
    refused = run(["nbdinfo", nbds(server, "fleet/vm1", pki.neighbour)], timeout=30,
                  check=False)
    # libnbd shows ERR_UNKNOWN, the answer to a name that does not exist, as ENOENT
    assert refused.returncode != 0 and "No such file or directory" in refused.stderr
    run(["nbdinfo", nbds(server, "fleet/vm1", pki.good)], timeout=30)
    run(["nbdinfo", nbds(server, "fleet/vm2", pki.neighbour)], timeout=30)
    assert server.stop() == 0 and "Traceback" not in server.stderr


def test_starttls_refused_when_tls_is_off(image, qcownbd_server):
    server = qcownbd_server(f"d={image}")
    client = NbdClient(server.port)
    client.greet()
    client.option(OPT_STARTTLS)
    assert client.option_reply()[:2] == (OPT_STARTTLS, ERR_POLICY)
    client.option(OPT_LIST)
    assert client.option_reply()[1] == 2           # still negotiating in clear text


@pytest.mark.parametrize("args, message", [
    (["--tls", "require"], "needs tls_cert and tls_key"),
    (["--tls", "on", "--tls-cert", "/nonexistent/c.pem", "--tls-key", "/nonexistent/k.pem"],
     "cannot load TLS certificate /nonexistent/c.pem"),
])
def test_bad_tls_settings_are_one_line_errors(args, message, image):
    result = run(qcownbd_cmd("serve", "--listen", "127.0.0.1:1", *args, f"d={image}"),
                 timeout=30, check=False, env=qcownbd_env())
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_abandoned_tls_handshakes_free_their_connection_slots(pki, image, tmp_path,
                                                              qcownbd_server):
    config = tmp_path / "limits.toml"
    config.write_text("[server]\nmax_connections = 3\nhandshake_timeout = 2\n")
    server = qcownbd_server("--config", config, *tls_args(pki, "require"), f"d={image}")
    for _ in range(4):
        # the client rejects the server's certificate and hangs up mid-handshake
        result = run(["nbdinfo", nbds(server, "d", pki.untrusting)], check=False, timeout=30)
        assert result.returncode != 0
        quitter = NbdClient(server.port)
        quitter.greet()
        quitter.option(OPT_STARTTLS)
        assert quitter.option_reply()[1] == REP_ACK
        quitter.sock.close()
    # a client stalling inside the TLS handshake is cut off by the handshake timeout
    staller = NbdClient(server.port)
    staller.greet()
    staller.option(OPT_STARTTLS)
    assert staller.option_reply()[1] == REP_ACK
    staller.sock.sendall(b"\x16\x03\x01")            # the start of a ClientHello, no more
    assert staller.closed()
    for _ in range(3):
        run(["nbdinfo", nbds(server, "d", pki.good)], timeout=30)
    assert server.stop() == 0
    assert "did not finish in time" not in server.stderr


@pytest.mark.parametrize("server, needle", [
    ({"tls": "maybe"}, "tls 'maybe' is not one of"),
    ({"tls": "on", "tls_cert": "c.pem"}, "needs tls_cert and tls_key"),
    ({"tls_verify_client": True}, "tls_verify_client needs tls_ca"),
    ({"tls": True}, "tls has the wrong type"),
    ({"max_handshakes": 0}, "max_handshakes must be positive"),
    ({"max_connections_per_client": -1}, "max_connections_per_client"),
])
def test_tls_and_limit_settings_are_checked_at_load(server, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_config({"server": server})


def test_tls_files_are_taken_relative_to_the_config(tmp_path):
    parsed = parse_config({"server": {"tls": "require", "tls_cert": "c.pem", "tls_key": "k.pem",
                                      "tls_ca": "ca.pem", "max_handshakes": 8}}, str(tmp_path))
    assert (parsed.tls, parsed.tls_cert, parsed.tls_key, parsed.tls_ca, parsed.max_handshakes) \
        == ("require", str(tmp_path / "c.pem"), str(tmp_path / "k.pem"),
            str(tmp_path / "ca.pem"), 8)
