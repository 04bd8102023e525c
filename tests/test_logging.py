"""What the server's log says of each client, and how journald files it.

Every connection gets one line for its negotiation: "attached" with what was
agreed, the moment it enters transmission, or "not attached" with why (an
unknown name, an allow list, TLS, a limit, a client that gave up).  Under
journald each line carries its sd-daemon(3) priority prefix.  The clients are
nbdinfo, qemu-io and the tests' raw client; no journald runs here, so the
journal's side is the format it reads.
"""

import os
import re
import ssl
import subprocess
import sys
import time

import pytest

from helpers import (REPO, LoggedServer, free_port, qcownbd_cmd, qcownbd_env, raw_file, run,
                     stop_process, wait_for, wait_listening)
from nbdclient import (ERR_TLS_REQD, ERR_UNKNOWN, OPT_ABORT, OPT_EXPORT_NAME, OPT_GO,
                       OPT_STARTTLS, REP_ACK, NbdClient, go_payload)

pytestmark = pytest.mark.timeout(120)
SIZE = 1024 * 1024
OUTCOME = re.compile(r"(\S+): (attached |not attached: )")


def label(client: NbdClient) -> str:
    """How the server names the raw client in its log."""
    return f"127.0.0.1:{client.sock.getsockname()[1]}"


def outcomes(log: str, who: str) -> list[str]:
    """The negotiation outcome lines of client ``who``, from "attached"/"not attached" on."""
    return [line.split(f"{who}: ", 1)[1] for line in log.splitlines()
            if (m := OUTCOME.search(line)) and m.group(1) == who]


def sole_outcome(server, who: str, expected: str) -> None:
    """The one outcome line of client ``who`` is ``expected`` (waited for)."""
    assert wait_for(lambda: outcomes(server.log, who)), server.log[-2000:]
    assert outcomes(server.log, who) == [expected], server.log[-2000:]


def lines_matching(server, pattern: str) -> list[str]:
    return [line for line in server.log.splitlines() if re.search(pattern, line)]


@pytest.fixture
def server(tmp_path):
    """Exports "d" (read-write), "ro" (read-only) and "hidden" (for another network)."""
    config = tmp_path / "c.toml"
    config.write_text(
        f'[exports.d]\npath = "{raw_file(tmp_path / "d.raw", b"d" * 512, SIZE)}"\n'
        f'[exports.ro]\npath = "{raw_file(tmp_path / "ro.raw", b"r" * 512, SIZE)}"\n'
        'read_only = true\n'
        f'[exports.hidden]\npath = "{raw_file(tmp_path / "h.raw", b"h" * 512, SIZE)}"\n'
        'allow = ["10.9.9.0/24"]\n')
    with LoggedServer("--config", config) as logged:
        yield logged


def test_a_client_is_logged_when_it_attaches_with_what_was_agreed(server):
    client = NbdClient(server.port)
    client_who = label(client)
    client.go("d", structured=True, contexts=[b"base:allocation"])
    # visible while it is still connected, not only when it leaves
    sole_outcome(server, client_who, "attached export=d replies=structured "
                                 "contexts=base:allocation tls=no read-only=no")
    extended = NbdClient(server.port)
    extended_who = label(extended)
    extended.go("ro", extended=True)
    sole_outcome(server, extended_who, "attached export=ro replies=extended contexts=- tls=no "
                                   "read-only=yes")
    client.close()
    extended.close()
    run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0x72 0 512", server.uri("ro")])
    run(["nbdinfo", server.uri("d")])
    # (a worker's lines say which worker it is)
    attached = r"INFO (worker \d+: )?127\.0\.0\.1:\d+: attached "
    assert lines_matching(server, attached + r"export=ro replies=\w+ contexts=\S+ tls=no "
                                             r"read-only=yes$")
    assert len(lines_matching(server, attached + "export=d ")) == 2


def test_a_refused_client_is_logged_with_the_reason(server):
    client = NbdClient(server.port)
    client_who = label(client)
    client.greet()
    client.option(OPT_GO, go_payload("nope"))
    assert client.option_reply()[1] == ERR_UNKNOWN
    client.option(OPT_ABORT)
    assert client.option_reply()[1] == REP_ACK
    client.sock.close()
    sole_outcome(server, client_who, "not attached: no export named 'nope'")
    # EXPORT_NAME cannot be refused politely: the server closes, and says why
    old_style = NbdClient(server.port)
    old_style_who = label(old_style)
    old_style.greet()
    old_style.option(OPT_EXPORT_NAME, b"old-nope")
    assert old_style.closed()
    sole_outcome(server, old_style_who, "not attached: no export named 'old-nope'")
    # the client reads "no export named", the operator reads the allow list
    refused = run(["qemu-io", "-f", "raw", "-r", "-c", "read 0 512", server.uri("hidden")],
                  check=False)
    assert refused.returncode != 0 and "no export named 'hidden'" in refused.stderr
    assert wait_for(lambda: lines_matching(
        server, r"WARNING 127\.0\.0\.1:\d+: not attached: export 'hidden' refused by its "
                r"allow list$"))
    assert run(["nbdinfo", server.uri("nbdinfo-nope")], check=False).returncode != 0
    assert wait_for(lambda: lines_matching(
        server, r"WARNING 127\.0\.0\.1:\d+: not attached: no export named 'nbdinfo-nope'$"))


def test_a_client_that_gives_up_is_logged_too(server):
    quitter = NbdClient(server.port)
    quitter_who = label(quitter)
    quitter.greet()
    quitter.sock.close()
    sole_outcome(server, quitter_who, "not attached: client left without choosing an export")
    run(["nbdinfo", "--list", server.uri()])
    assert wait_for(lambda: lines_matching(
        server, r"INFO 127\.0\.0\.1:\d+: not attached: client left after listing the exports$"))


def test_refusals_are_rate_limited_but_every_attachment_is_logged(server):
    for _ in range(15):
        client = NbdClient(server.port)
        client.greet()
        client.option(OPT_EXPORT_NAME, b"nope")
        assert client.closed()
        NbdClient.connect(server.port, "d").close()
    assert wait_for(lambda: len(lines_matching(server, r": closed export=d ")) == 15)
    assert len(lines_matching(server, r": attached export=d ")) == 15
    # the server's RateLimitedLog: ten lines of a kind per ten seconds
    assert len(lines_matching(server, r": not attached: no export named 'nope'$")) == 10


def test_limits_are_logged_as_the_reason(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("[server]\nmax_connections = 2\nhandshake_timeout = 1\n"
                      f'[exports.d]\npath = "{raw_file(tmp_path / "d.raw", b"", SIZE)}"\n')
    with LoggedServer("--config", config) as server:
        staller = NbdClient(server.port)
        staller_who = label(staller)
        staller.greet()
        assert staller.closed()
        sole_outcome(server, staller_who, "not attached: handshake timed out")
        holders = [NbdClient.connect(server.port, "d") for _ in range(2)]
        assert NbdClient(server.port).closed()
        assert wait_for(lambda: lines_matching(
            server, r"WARNING 127\.0\.0\.1:\d+: not attached: too many connections$"))
        for holder in holders:
            holder.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed server certificate and key for 127.0.0.1."""
    where = tmp_path_factory.mktemp("tls")
    run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1", "-addext",
         "subjectAltName=IP:127.0.0.1", "-keyout", where / "key.pem", "-out", where / "cert.pem"],
        timeout=30)
    return where / "cert.pem", where / "key.pem"


def test_tls_required_and_tls_agreed_are_logged(tmp_path, certificate):
    cert, key = certificate
    image = raw_file(tmp_path / "d.raw", b"", SIZE)
    with LoggedServer("--tls", "require", "--tls-cert", cert, "--tls-key", key,
                      f"d={image}") as server:
        assert run(["nbdinfo", server.uri("d")], check=False).returncode != 0
        assert wait_for(lambda: lines_matching(
            server, r"WARNING 127\.0\.0\.1:\d+: not attached: TLS is required; the client "
                    r"did not use STARTTLS$"))
        plain = NbdClient(server.port)
        plain_who = label(plain)
        plain.greet()
        plain.option(OPT_GO, go_payload("d"))
        assert plain.option_reply()[1] == ERR_TLS_REQD
        plain.sock.close()
        sole_outcome(server, plain_who, "not attached: TLS is required; the client did not use "
                                    "STARTTLS")
        secure = NbdClient(server.port)
        who = label(secure)
        secure.greet()
        secure.option(OPT_STARTTLS)
        assert secure.option_reply()[1] == REP_ACK
        context = ssl.create_default_context(cafile=str(cert))
        secure.sock = context.wrap_socket(secure.sock, server_hostname="127.0.0.1")
        secure.option(OPT_GO, go_payload("d"))
        while secure.option_reply()[1] != REP_ACK:
            pass
        assert wait_for(lambda: outcomes(server.log, who))
        assert outcomes(server.log, who) == [
            "attached export=d replies=simple contexts=- tls=yes read-only=no"]
        secure.close()


# -- journald priorities ---------------------------------------------------------------

PRIORITIES = {"DEBUG": "7", "INFO": "6", "WARNING": "4", "ERROR": "3", "CRITICAL": "2"}


def serve_with_stderr(tmp_path, journal: str | None) -> list[str]:
    """Run a server (an export that serves, one that cannot open) with stderr in a file,
    JOURNAL_STREAM set to ``journal`` ("file": that file's device:inode), refuse one
    client and serve another, stop it; the lines of its stderr."""
    config = tmp_path / "c.toml"
    config.write_text(f'[exports.d]\npath = "{raw_file(tmp_path / "d.raw", b"", SIZE)}"\n'
                      f'[exports.broken]\npath = "{tmp_path / "missing.raw"}"\n')
    port = free_port()
    with open(tmp_path / "stderr", "w+") as stderr:
        st = os.fstat(stderr.fileno())
        env = qcownbd_env()
        env.pop("JOURNAL_STREAM", None)
        if journal is not None:
            env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}" if journal == "file" else journal
        proc = subprocess.Popen(qcownbd_cmd("serve", "--listen", f"127.0.0.1:{port}", "--config",
                                            config), stdout=subprocess.DEVNULL, stderr=stderr,
                                env=env)
        try:
            wait_listening(port, proc)
            run(["nbdinfo", f"nbd://127.0.0.1:{port}/nope"], check=False)
            run(["nbdinfo", f"nbd://127.0.0.1:{port}/d"])
            time.sleep(0.5)
        finally:
            assert stop_process(proc) == 0
        stderr.seek(0)
        return stderr.read().splitlines()


def test_lines_carry_their_priority_when_stderr_is_the_journal(tmp_path):
    lines = serve_with_stderr(tmp_path, "file")
    levels = set()
    for line in lines:
        match = re.fullmatch(r"<(\d)>(DEBUG|INFO|WARNING|ERROR|CRITICAL) .*", line)
        assert match and match.group(1) == PRIORITIES[match.group(2)], line
        levels.add(match.group(2))
    assert levels == {"INFO", "WARNING", "ERROR"}, lines
    assert any("export broken" in line for line in lines if line.startswith("<3>"))
    assert any("not attached: no export named 'nope'" in line
               for line in lines if line.startswith("<4>"))


@pytest.mark.parametrize("journal", [None, "8:123456"])
def test_no_priority_prefix_when_stderr_is_not_the_journal(tmp_path, journal):
    lines = serve_with_stderr(tmp_path, journal)
    assert any("not attached: no export named 'nope'" in line for line in lines)
    assert not any(line.startswith("<") for line in lines), lines


def test_a_failed_command_is_an_error_line_under_journald(tmp_path):
    with open(tmp_path / "stderr", "w+") as stderr:
        st = os.fstat(stderr.fileno())
        result = subprocess.run(
            qcownbd_cmd("info", tmp_path / "missing.qcow"), stderr=stderr,
            stdout=subprocess.DEVNULL, timeout=60,
            env=qcownbd_env(JOURNAL_STREAM=f"{st.st_dev}:{st.st_ino}"))
        stderr.seek(0)
        text = stderr.read()
    assert result.returncode == 1
    assert re.fullmatch(r"<3>qcownbd: error: \S+missing\.qcow: no such file\n", text), text


# every level, and a record of several lines (a traceback): each line its own entry
CHILD = r"""
import argparse, logging, os, sys
st = os.fstat(2)
os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
from qcownbd.console import setup_logging
setup_logging(argparse.Namespace(log_level=None, verbose=True, quiet=False))
log = logging.getLogger("qcownbd.test")
log.debug("debug event")
log.info("info event")
log.warning("warning event")
log.error("error event")
log.critical("critical event")
try:
    raise ValueError("boom")
except ValueError:
    log.exception("with a traceback")
"""


def test_every_level_and_every_line_of_a_record_has_its_priority(tmp_path):
    with open(tmp_path / "stderr", "w+") as stderr:
        subprocess.run([sys.executable, "-c", CHILD], stderr=stderr, timeout=30, check=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
        stderr.seek(0)
        lines = stderr.read().splitlines()
    assert lines[:5] == ["<7>DEBUG debug event", "<6>INFO info event",
                         "<4>WARNING warning event", "<3>ERROR error event",
                         "<2>CRITICAL critical event"]
    assert lines[5] == "<3>ERROR with a traceback"
    assert len(lines) > 7 and all(line.startswith("<3>") for line in lines[5:]), lines
    assert lines[-1] == "<3>ValueError: boom"
