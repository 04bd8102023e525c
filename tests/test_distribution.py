"""`python -m build`: a clean build, the licence and metadata, and an sdist that
holds the whole checkout, complete enough to run the tests from."""

import email.parser
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from helpers import REPO, copy_checkout, run

VERSION_CLASSIFIERS = [f"Programming Language :: Python :: 3.{minor}" for minor in (11, 12, 13)]
#: Files of the checkout an sdist has no use for.
NOT_SHIPPED = {".gitignore"}
#: Tests run from the unpacked sdist: the codec, a server with real clients, and
#: the ones that read systemd/, .ci/ and the README.
SDIST_SUBSET = [
    "tests/test_nbd_protocol.py",
    "tests/test_server_clients.py::test_nbdinfo_list_json_and_nbd_client_list",
    "tests/test_systemd.py::test_example_config_loads_and_documents_every_option",
    "tests/test_packaging_runner.py::test_ci_runs_the_readme_command",
]


def build_env() -> dict[str, str]:
    """A plain environment for the build, so its output is the build's own: with
    PYTHONDONTWRITEBYTECODE (set on some machines) setuptools warns that it
    does not byte-compile."""
    return {key: value for key, value in os.environ.items()
            if key != "PYTHONDONTWRITEBYTECODE"}


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    """Build sdist and wheel from a copy of the checkout; (copy, sdist, wheel, output)."""
    top = tmp_path_factory.mktemp("dist")
    src = copy_checkout(top / "src")
    venv = top / "venv"
    run([sys.executable, "-m", "venv", venv], timeout=60)
    run([venv / "bin/python", "-m", "pip", "install", "--quiet", "build"], timeout=180)
    out = run([venv / "bin/python", "-m", "build", "--outdir", top / "out", src],
              timeout=300, env=build_env(), check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    (sdist,) = (top / "out").glob("qcownbd-*.tar.gz")
    (wheel,) = (top / "out").glob("qcownbd-*.whl")
    return src, sdist, wheel, out.stdout + out.stderr


def sdist_names(sdist: Path) -> set[str]:
    """The sdist's file names, without the top directory qcownbd-VERSION/."""
    with tarfile.open(sdist) as tar:
        return {member.name.split("/", 1)[1] for member in tar.getmembers()
                if member.isfile()}


def checkout_files(copy: Path) -> set[str]:
    """The files of the checkout: those git tracks, or, without git (an unpacked
    sdist), every file of its copy."""
    if (REPO / ".git").exists():
        return set(run(["git", "-C", REPO, "ls-files"], timeout=30).stdout.splitlines())
    return {str(path.relative_to(copy)) for path in copy.rglob("*") if path.is_file()}


@pytest.mark.timeout(360)
def test_build_says_no_warning(dist):
    output = dist[3]
    assert "Successfully built" in output
    assert "warning" not in output.lower(), output


@pytest.mark.timeout(360)
def test_license_is_the_full_gpl2_in_checkout_sdist_and_wheel(dist):
    _src, sdist, wheel, _ = dist
    text = (REPO / "LICENSE").read_text()
    assert text.lstrip().startswith("GNU GENERAL PUBLIC LICENSE\n                       Version 2")
    assert "END OF TERMS AND CONDITIONS" in text and "How to Apply These Terms" in text
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        assert tar.extractfile(f"{top}/LICENSE").read().decode() == text
    with zipfile.ZipFile(wheel) as whl:
        licenses = [name for name in whl.namelist() if name.endswith(".dist-info/licenses/LICENSE")]
        assert len(licenses) == 1, whl.namelist()
        assert whl.read(licenses[0]).decode() == text


@pytest.mark.timeout(360)
def test_wheel_metadata_names_licence_authors_and_audience(dist):
    with zipfile.ZipFile(dist[2]) as whl:
        (name,) = [n for n in whl.namelist() if n.endswith(".dist-info/METADATA")]
        meta = email.parser.Parser().parsestr(whl.read(name).decode())
    assert meta["License-Expression"] == "GPL-2.0-or-later"
    assert meta["License-File"] == "LICENSE"
    assert "License" not in meta, "the deprecated free-text License field"
    assert meta["Author"] or meta["Author-email"]
    assert meta["Requires-Python"] == ">=3.11"
    classifiers = meta.get_all("Classifier")
    assert set(VERSION_CLASSIFIERS) <= set(classifiers)
    for prefix in ("Intended Audience :: ", "Environment :: ", "Topic :: ",
                   "Operating System :: "):
        assert any(c.startswith(prefix) for c in classifiers), prefix
    assert not any(c.startswith("License :: ") for c in classifiers), \
        "PEP 639: the SPDX expression replaces licence classifiers"


@pytest.mark.timeout(360)
def test_sdist_holds_every_file_of_the_checkout(dist):
    src, sdist, _wheel, _ = dist
    names = sdist_names(sdist)
    assert checkout_files(src) - NOT_SHIPPED - names == set()
    for needed in ("CREDITS", "LICENSE", "README.md", "systemd/exports.toml",
                   "systemd/qcownbd.service", "tests/conftest.py", "tests/run.sh",
                   "tests/helpers.py", "tests/vm/guest.py", "tests/bench/run_bench.py"):
        assert needed in names, needed
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in names)


@pytest.mark.timeout(420)
def test_tests_run_from_the_unpacked_sdist(dist, tmp_path):
    run(["tar", "-xzf", dist[1], "-C", tmp_path], timeout=60)
    (tree,) = tmp_path.iterdir()
    # `python -m pytest` puts the unpacked tree first on sys.path, and helpers.py
    # hands it to the servers it starts: this checkout is not used.
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=300",
         *SDIST_SUBSET], cwd=tree, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
