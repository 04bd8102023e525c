"""tests/run.sh (the README's test command and CI's) in the cases CI rarely meets.

The script runs against stand-ins for `dpkg-query`, `id` and `apt-get` placed
first on PATH, so these tests install nothing on the machine.
"""

import shutil
import subprocess
import sys

import pytest

from helpers import REPO, run

RUN_SH = REPO / "tests" / "run.sh"


def fake_tools(bin_dir, *, installed: bool, uid: int):
    """dpkg-query answering for every package, id -u answering UID, and an
    apt-get that only appends its arguments to bin_dir/apt-get.log."""
    bin_dir.mkdir()
    status = "install ok installed" if installed else "unknown ok not-installed"
    (bin_dir / "dpkg-query").write_text(f"#!/bin/sh\nprintf '%s' '{status}'\n")
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {bin_dir}/apt-get.log\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)


def run_script(script, bin_dir, env_extra=None, timeout=120):
    env = {"PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin", "HOME": str(bin_dir),
           **(env_extra or {})}
    return subprocess.run(["bash", str(script)], capture_output=True, text=True,
                          env=env, timeout=timeout, stdin=subprocess.DEVNULL)


def test_ci_runs_the_readme_command():
    ci = (REPO / ".ci" / "run").read_text()
    assert "exec bash tests/run.sh\n" in ci
    assert "\nbash tests/run.sh\n" in (REPO / "README.md").read_text()


def test_missing_packages_without_root_stop_with_their_names(tmp_path):
    fake_tools(tmp_path / "bin", installed=False, uid=1000)
    out = run_script(RUN_SH, tmp_path / "bin", timeout=30)
    assert out.returncode == 1
    assert "missing Debian packages: qemu-utils" in out.stderr
    assert "nbd-client" in out.stderr and "run this script as root" in out.stderr
    assert not (tmp_path / "bin" / "apt-get.log").exists()


def test_missing_packages_as_root_are_installed_after_one_update(tmp_path):
    fake_tools(tmp_path / "bin", installed=False, uid=0)
    # The fake apt-get installs nothing, so the run goes on to pip; stop it
    # there with a python that does not exist.
    out = run_script(RUN_SH, tmp_path / "bin", {"PYTHON": str(tmp_path / "no-python")},
                     timeout=30)
    assert out.returncode != 0
    update, install = (tmp_path / "bin" / "apt-get.log").read_text().splitlines()
    assert update == "update -q"
    assert install.startswith("install -y -q --no-install-recommends qemu-utils ")
    assert {"python3-libnbd", "nbd-client", "fio", "systemd"} <= set(install.split())


@pytest.mark.timeout(180)
def test_no_tests_collected_is_a_failure(tmp_path):
    # A one-module project with an empty tests/ directory, tested by the real
    # script, with a venv of its own as "the current python".
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    shutil.copy(RUN_SH, project / "tests" / "run.sh")
    (project / "empty.py").write_text("")
    (project / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools>=61"]\nbuild-backend = "setuptools.build_meta"\n'
        '[project]\nname = "empty"\nversion = "0"\n'
        '[tool.setuptools]\npy-modules = ["empty"]\n')
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--system-site-packages", venv], timeout=60)
    fake_tools(tmp_path / "bin", installed=True, uid=0)
    out = run_script(project / "tests" / "run.sh", tmp_path / "bin",
                     {"PYTHON": str(venv / "bin" / "python")}, timeout=150)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "pytest collected no tests: that is a failure" in out.stderr
    assert "no tests ran" in out.stdout
    assert (tmp_path / "bin" / "apt-get.log").read_text() == "update -q\n"
