"""The README as a new user meets it, run: command one in a fresh venv with an
empty HOME, Debian's venv recipe, then every recipe that runs on one machine.

Recipes are the fenced blocks marked `<!-- walkthrough: NAME -->` on the line
before, run verbatim as bash scripts (`set -e`: a paste that fails anywhere
fails here).  Where the README starts a server in a terminal of its own and
the client in another, the walkthrough starts it the way the README
recommends for scripts, `qcownbd serve --fork --pid-file FILE`, and runs the
client right after it, with no wait in between.  Servers run in a network
namespace of their own, so the README's default port 10809 on 127.0.0.1 is
theirs whatever else runs on this machine; pip there has no package index
and takes the build backend from a directory filled beforehand.
Every shell block of the README is either walked or named in NOT_WALKED
with the reason.
"""

import itertools
import os
import re
import signal
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from helpers import REPO, copy_checkout, free_port, run, stop_process, wait_for, wait_listening

README = REPO / "README.md"
MARKED = re.compile(r"^<!-- walkthrough: ([\w-]+) -->\n```sh\n(.*?)^```$", re.M | re.S)
#: A server started in the foreground: the walkthrough adds --fork --pid-file
#: (not to one that forks already, or runs its client with --run).
FOREGROUND_SERVE = re.compile(r"(\S*qcownbd serve)(?![^\n]*--(?:fork|run))")
#: README sections whose shell blocks are not run here, and why.
NOT_WALKED = {
    "Command two: the whole test suite": "it is the suite this test is part of",
    "Serve images": "it serves the user's own images under /srv/images",
    "Attach with the Linux kernel client": "it needs the nbd kernel module and a host called HOST",
    "Use an export from QEMU": "it needs a server on a host called HOST and a guest to boot",
    "Boot a VM from an export": "it needs a bootable disk image and KVM",
    "A config with several exports": "it serves /etc/qcownbd/exports.toml, the machine's own",
    "Fleets: many VMs from one golden image": "it needs the machine's /etc/qcownbd and VMs",
    "Install the systemd units": "it installs into the machine's /etc and /usr/local",
    "Performance": "it runs for 25 minutes; tests/test_bench.py runs the benchmark briefly",
    "Boot storm": "it runs for 15 minutes or more; tests/test_bench.py runs a tiny storm",
}


def readme_blocks() -> dict[str, str]:
    """The README's marked blocks: {NAME: shell text}."""
    return {match.group(1): match.group(2) for match in MARKED.finditer(README.read_text())}


def shell_blocks_by_section() -> list[tuple[str, str | None]]:
    """(section heading, walkthrough NAME or None) for every ```sh block, in order."""
    found, heading, marker, fenced = [], "", None, False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            if not fenced and line == "```sh":
                found.append((heading, marker))
            fenced = not fenced
        elif not fenced:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            match = re.fullmatch(r"<!-- walkthrough: ([\w-]+) -->", line)
            marker = match.group(1) if match else None
    return found


class Sandbox:
    """A user's session: an empty HOME, a copy of the checkout to type commands in,
    a fresh venv, and bash scripts run in a network namespace of their own."""

    def __init__(self, top: Path):
        self.top = top
        self.checkout = copy_checkout(top / "qcownbd")
        self.wheels = top / "wheels"
        self.venv = top / "venv"
        self.pids = top / "pids"
        self.pids.mkdir()
        self.serial = itertools.count()
        requires = tomllib.loads((self.checkout / "pyproject.toml").read_text())[
            "build-system"]["requires"]
        run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
             "--dest", self.wheels, *requires], timeout=180)
        run([sys.executable, "-m", "venv", self.venv], timeout=60)
        # `python3` is the python under test, for the recipes that call it
        (top / "bin").mkdir()
        (top / "bin" / "python3").symlink_to(sys.executable)

    def env(self, home: Path, *path: Path) -> dict[str, str]:
        """A login's environment: HOME, PATH with ``path`` first, pip offline."""
        home.mkdir(parents=True, exist_ok=True)
        dirs = [*map(str, path), str(self.top / "bin"), os.environ["PATH"]]
        return {"HOME": str(home), "PATH": ":".join(dirs), "LANG": "C.UTF-8",
                "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(self.wheels),
                "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_ROOT_USER_ACTION": "ignore"}

    def background(self, block: str) -> str:
        """``block`` with each foreground `qcownbd serve` forked, pid files in self.pids."""
        return FOREGROUND_SERVE.sub(
            lambda m: f"{m.group(1)} --fork --pid-file {self.pids}/{next(self.serial)}.pid",
            block)

    def bash(self, *blocks: str, env: dict, cwd: Path, timeout: float = 120) -> str:
        """Run the blocks as one bash script in a new network namespace (loopback
        up); its output.  Servers it forked are stopped afterwards."""
        script = "set -ex\nip link set lo up\n" + "\n".join(blocks)
        log = self.top / f"step-{next(self.serial)}.log"
        unshare = ["unshare", "--net", *([] if os.geteuid() == 0 else ["--map-root-user"])]
        try:
            with open(log, "w") as out:
                status = subprocess.run([*unshare, "bash", "-c", script], env=env, cwd=cwd,
                                        stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, timeout=timeout).returncode
        finally:
            self.stop_servers()
        text = log.read_text()
        assert status == 0, f"exit {status}:\n{text[-6000:]}"
        return text

    def stop_servers(self) -> None:
        """SIGTERM every server a script forked, and wait until it is gone."""
        for pid_file in self.pids.glob("*.pid"):
            pid = int(pid_file.read_text().split()[0])
            pid_file.unlink()
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            assert wait_for(lambda: not Path(f"/proc/{pid}").exists(), 20), f"{pid} lives on"

    def installed(self) -> Path:
        """The venv's bin/, with this checkout installed (the README's command one
        installs it, when it ran first)."""
        bin_dir = self.venv / "bin"
        if not (bin_dir / "qcownbd").exists():
            run([bin_dir / "pip", "install", "--quiet", "."], timeout=180, cwd=self.checkout,
                env=self.env(self.top / "home-install"))
        return bin_dir


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    """One Sandbox for the module: the venv that command one installs into is
    the one later recipes use."""
    return Sandbox(tmp_path_factory.mktemp("walkthrough"))


@pytest.mark.timeout(60)
def test_every_shell_block_is_walked_or_says_why_not():
    blocks = shell_blocks_by_section()
    unwalked = {heading for heading, marker in blocks if marker is None}
    assert unwalked <= set(NOT_WALKED), f"walk these, or say why not: {unwalked - set(NOT_WALKED)}"
    assert set(NOT_WALKED) <= unwalked, f"walked now, or gone: {set(NOT_WALKED) - unwalked}"
    names = [marker for _heading, marker in blocks if marker]
    assert sorted(names) == sorted(readme_blocks()) and len(set(names)) == len(names)


@pytest.mark.timeout(180)
def test_command_one_in_a_fresh_venv(sandbox):
    blocks = readme_blocks()
    home = sandbox.top / "home-one"
    out = sandbox.bash(sandbox.background(blocks["command-one"]), blocks["demo-clients"],
                       env=sandbox.env(home, sandbox.venv / "bin"), cwd=sandbox.checkout)
    assert "export-size: 67108864" in out
    assert "data" in out and "hole,zero" in out, "nbdinfo --map: one data cluster, then a hole"
    assert "\nqcownbd demo disk\n" in out
    assert (home / ".local/share/qcownbd/demo.qcow").is_file()


@pytest.mark.timeout(180)
def test_debian_venv_recipe_and_the_installed_command(sandbox):
    blocks = readme_blocks()
    home = sandbox.top / "home-debian"
    # the checkout where `git clone` puts it, which the venv must leave alone
    checkout = copy_checkout(home / "qcownbd")
    out = sandbox.bash(sandbox.background(blocks["debian-venv"]), blocks["demo-clients"],
                       blocks["activate"], "command -v qcownbd",
                       env=sandbox.env(home), cwd=checkout)
    assert "\nqcownbd demo disk\n" in out
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert f"\nqcownbd {version}\n" in out, "qcownbd --version after activating"
    installed = f"{home}/.venvs/qcownbd/bin/qcownbd"
    assert re.search(rf"^{re.escape(installed)}$", out, re.M), "command -v qcownbd"
    assert not (checkout / "pyvenv.cfg").exists() and not (checkout / "bin").exists()


@pytest.mark.timeout(120)
def test_create_and_convert_paste_as_a_whole(sandbox, tmp_path):
    bin_dir = sandbox.installed()
    out = sandbox.bash(readme_blocks()["create-convert"], env=sandbox.env(tmp_path / "home",
                                                                          bin_dir), cwd=tmp_path)
    assert out.count("No errors were found on the image.") == 2
    assert run(["qemu-img", "compare", "-f", "raw", tmp_path / "disk.raw",
                "-F", "qcow", tmp_path / "disk.qcow"]).returncode == 0
    assert os.stat(tmp_path / "disk.raw").st_blocks == 0, "the raw copy stays sparse"


@pytest.mark.timeout(120)
def test_script_recipe_forks_waits_and_runs_a_captive_client(sandbox, tmp_path):
    bin_dir = sandbox.installed()
    out = sandbox.bash(readme_blocks()["scripts"], env=sandbox.env(tmp_path / "home", bin_dir),
                       cwd=tmp_path)
    assert "export-size: 67108864" in out
    assert not (tmp_path / "qcownbd.pid").exists() and not (tmp_path / "q.sock").exists()
    assert (tmp_path / "disk.raw").stat().st_size == 64 << 20


@pytest.mark.timeout(120)
def test_snapshot_recipe_keeps_the_monday_disk_and_commits(sandbox, tmp_path):
    bin_dir = sandbox.installed()
    out = sandbox.bash(readme_blocks()["snapshots"], env=sandbox.env(tmp_path / "home", bin_dir),
                       cwd=tmp_path)
    assert "vm-monday.qcow" in out and "Image committed" in out
    assert re.search(r"^vm +\S+vm\.qcow +qcow1 +1 GiB +rw", out, re.M), "qcownbd status"
    # the snapshot holds Monday's disk plus the commit; the overlay is empty again
    run(["qemu-io", "-f", "qcow", "-r", "-c", "read -P 2 0 64k", "-c", "read -P 1 64k 960k",
         tmp_path / "vm-monday.qcow"])
    run(["qemu-img", "compare", "-f", "qcow", tmp_path / "vm.qcow", "-F", "qcow",
         tmp_path / "vm-monday.qcow"])


@pytest.mark.timeout(120)
def test_upgrade_recipe_hands_over_twice_and_the_data_is_there(sandbox, tmp_path):
    bin_dir = sandbox.installed()
    out = sandbox.bash(readme_blocks()["upgrade"], env=sandbox.env(tmp_path / "home", bin_dir),
                       cwd=tmp_path)
    upgraded = re.search(r"^upgraded: pid (\d+) serves now \(was pid (\d+)\)$", out, re.M)
    assert upgraded and upgraded[1] != upgraded[2], out
    assert "read 1048576/1048576 bytes at offset 0" in out
    assert not (tmp_path / "qcownbd.pid").exists()
    run(["qemu-io", "-f", "qcow", "-r", "-c", "read -P 7 0 1M", tmp_path / "disk.qcow"])


@pytest.mark.timeout(120)
def test_workers_recipe_shows_the_workers(sandbox, tmp_path):
    bin_dir = sandbox.installed()
    out = sandbox.bash(readme_blocks()["workers"], env=sandbox.env(tmp_path / "home", bin_dir),
                       cwd=tmp_path)
    assert "read 1048576/1048576 bytes at offset 0" in out
    # index, pid, connections, metadata cache ("4 KiB of 16 MiB"), exports
    rows = re.findall(r"^([01])\s+(\d+)\s+\d+\s+\S+ \S+ of \S+ \S+\s+(.*)$", out, re.M)
    assert [row[0] for row in rows] == ["0", "1"] and \
        sum(row[2].split(", ").count("disk") for row in rows) == 1, out
    assert not (tmp_path / "qcownbd.pid").exists()
    run(["qemu-io", "-f", "qcow", "-r", "-c", "read -P 7 0 1M", tmp_path / "disk.qcow"])


@pytest.mark.timeout(120)
def test_tls_certificates_recipe_serves_nbds(sandbox, tmp_path):
    bin_dir = sandbox.installed()
    env = sandbox.env(tmp_path / "home", bin_dir)
    sandbox.bash(readme_blocks()["tls-certificates"], env=env, cwd=tmp_path)
    for key in ("ca-key.pem", "server-key.pem", "client1/client-key.pem"):
        assert (tmp_path / key).stat().st_mode & 0o077 == 0, f"{key} is readable by others"
    run(["qemu-img", "create", "-q", "-f", "qcow", tmp_path / "disk.qcow", "1M"])
    # the server as the README's prose starts it, on a free port of this machine
    port = free_port()
    server = subprocess.Popen(
        [bin_dir / "qcownbd", "serve", "--listen", f"127.0.0.1:{port}", "--tls", "require",
         "--tls-cert", "server-cert.pem", "--tls-key", "server-key.pem", "--tls-ca",
         "ca-cert.pem", "disk=disk.qcow"], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_listening(port, server)
        info = run(["nbdinfo", f"nbds://127.0.0.1:{port}/disk?tls-certificates=client1"],
                   cwd=tmp_path, timeout=30).stdout
        assert "with TLS" in info and "export-size: 1048576" in info
        plain = run(["nbdinfo", f"nbd://127.0.0.1:{port}/disk"], check=False, timeout=30)
        assert plain.returncode != 0, "TLS is required"
    finally:
        assert stop_process(server) == 0
        log = server.stderr.read()
        server.stderr.close()
    assert "client client1" in log, log


@pytest.mark.timeout(30)
def test_readme_says_what_read_only_covers_and_where_disks_come_from():
    text = " ".join(README.read_text().split())
    assert "`--read-only` covers every export of that server, those of `--config`" in text
    assert "`--read-only` refuses a config with a fleet" in text
    assert "`debian.qcow2` stands for any bootable disk image you have" in text
    assert "`sudo apt-get install python3-venv` (as root, without `sudo`)" in text
