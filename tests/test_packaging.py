"""`pip install .` into a fresh virtual environment gives a working `qcownbd`."""

import os
import shutil
import subprocess
import sys
import tomllib

import pytest

from helpers import REPO, free_port, run, wait_listening

SUBCOMMANDS = ("serve", "create", "info", "map", "check", "convert")


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """A new venv with this checkout pip-installed from a copy (no build litter in the tree)."""
    top = tmp_path_factory.mktemp("packaging")
    src = top / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    shutil.copytree(REPO / "qcownbd", src / "qcownbd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    env_dir = top / "venv"
    run([sys.executable, "-m", "venv", env_dir], timeout=60)
    run([env_dir / "bin/python", "-m", "pip", "install", "--quiet", "--no-deps",
         "--disable-pip-version-check", src], timeout=120)
    return env_dir


def in_venv(venv, *cmd):
    """Run a venv command from outside the checkout, so only the installed copy is seen."""
    return run([venv / "bin" / cmd[0], *cmd[1:]], timeout=60, cwd=venv)


@pytest.mark.timeout(180)
def test_version_of_console_script_and_module_agree(venv):
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    script = in_venv(venv, "qcownbd", "--version").stdout.strip()
    module = in_venv(venv, "python", "-m", "qcownbd", "--version").stdout.strip()
    assert script == module == f"qcownbd {version}"


@pytest.mark.timeout(180)
def test_help_lists_every_subcommand(venv):
    help_text = in_venv(venv, "qcownbd", "--help").stdout
    listed = {line.split()[0] for line in help_text.splitlines()
              if line.startswith("    ") and line.split()}
    assert set(SUBCOMMANDS) <= listed, help_text
    for name in SUBCOMMANDS:
        assert in_venv(venv, "qcownbd", name, "--help").returncode == 0


@pytest.mark.timeout(180)
def test_installed_copy_is_used_and_needs_nothing_else(venv):
    probe = ("import importlib.metadata as m, qcownbd; "
             "print(qcownbd.__file__); print(m.requires('qcownbd') or [])")
    where, requires = in_venv(venv, "python", "-c", probe).stdout.splitlines()
    assert where.startswith(str(venv)) and "site-packages" in where
    assert requires == "[]"


@pytest.mark.timeout(60)
def test_a_mistyped_command_is_one_line_and_exit_2(venv):
    out = subprocess.run([venv / "bin/qcownbd", "serv"], capture_output=True, text=True,
                         timeout=30, cwd=venv)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "invalid choice" in out.stderr


@pytest.mark.timeout(120)
def test_readme_command_one_serves_the_demo(venv, tmp_path):
    # `qcownbd serve --demo` from the installed package, on a free port
    # instead of 10809; XDG_DATA_HOME keeps the demo image in tmp_path.
    port = free_port()
    proc = subprocess.Popen([venv / "bin/qcownbd", "serve", "--demo", "--listen",
                             f"127.0.0.1:{port}"], cwd=tmp_path, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "XDG_DATA_HOME": str(tmp_path)})
    try:
        wait_listening(port, proc)
        listing = run(["nbdinfo", "--list", f"nbd://127.0.0.1:{port}/"], timeout=30).stdout
        assert 'export="demo"' in listing
        size = run(["nbdinfo", "--size", f"nbd://127.0.0.1:{port}/"], timeout=30).stdout
        assert int(size) == 64 * 1024 * 1024
        head = run(["nbdcopy", f"nbd://127.0.0.1:{port}/demo", "-"], timeout=30).stdout
        assert head.startswith("qcownbd demo disk\n")
        assert run(["qemu-img", "info", "-U", "--output=json", tmp_path / "qcownbd/demo.qcow"]
                   ).stdout.count('"format": "qcow"') == 1
    finally:
        proc.terminate()
        assert proc.wait(20) == 0
        proc.stderr.close()
