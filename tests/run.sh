#!/usr/bin/env bash
# The whole qcownbd test suite on a Debian 12 machine, from a fresh clone.
#
# As root: refreshes the package lists (apt-get update, once) and installs what
# the tests drive (QEMU, libnbd, nbd-client, fio, systemd tools, ...) when
# missing. Then installs this project and pytest into the current python and
# runs pytest. Extra arguments go to pytest: `bash tests/run.sh -x -k nbd`.
# .ci/run runs exactly this script.
set -euo pipefail
shopt -s inherit_errexit
cd "$(dirname "$0")/.."

# Debian packages the tests need; a missing tool is installed, never skipped.
PACKAGES=(
    qemu-utils qemu-system-x86 qemu-system-data
    libnbd-bin python3-libnbd nbd-client nbd-server nbdkit
    fio systemd procps e2fsprogs strace openssl groff-base man-db iproute2
    wget debian-archive-keyring  # debootstrap (run from its .deb) for the systemd guest
)
# Whole-run bound (seconds) and per-test bound for pytest-timeout.
SUITE_TIMEOUT=1800
TEST_TIMEOUT=600

say() { echo "tests/run.sh: $*" >&2; }

install_debian_packages() {
    if ! command -v dpkg-query >/dev/null; then
        say "dpkg-query not found: this script installs test tools on Debian 12 only"
        exit 1
    fi
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$pkg")
    done
    if [ "$(id -u)" -ne 0 ]; then
        if [ ${#missing[@]} -gt 0 ]; then
            say "missing Debian packages: ${missing[*]}"
            say "run this script as root, or first: sudo apt-get install ${missing[*]}"
            exit 1
        fi
        return 0
    fi
    # Fresh package lists also serve the VM tests, which `apt-get download`
    # a guest kernel and busybox (tests/vm/packages.py).
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -q </dev/null; then
        [ ${#missing[@]} -gt 0 ] && { say "apt-get update failed"; exit 1; }
        say "apt-get update failed; going on with the installed tools"
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]}"
    apt-get install -y -q --no-install-recommends "${missing[@]}" </dev/null
}

# The python to test with: python3 itself, or a venv beside the checkout when
# python3 is an "externally managed" system python (PEP 668).
choose_python() {
    local python=${PYTHON:-python3}
    if "$python" - <<'PY'
import os, sys, sysconfig
managed = os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))
sys.exit(0 if managed and sys.prefix == sys.base_prefix else 1)
PY
    then
        say "$python is externally managed (PEP 668): using the venv .venv"
        [ -x .venv/bin/python ] || "$python" -m venv --system-site-packages .venv
        python=.venv/bin/python
    fi
    echo "$python"
}

install_python_packages() {
    export PIP_ROOT_USER_ACTION=ignore  # root is expected here (CI, fresh machines)
    local python=$1
    "$python" -m pip install --quiet --disable-pip-version-check . </dev/null
    if ! "$python" -c 'import pytest, pytest_timeout' 2>/dev/null; then
        "$python" -m pip install --quiet --disable-pip-version-check \
            pytest pytest-timeout </dev/null
    fi
}

install_debian_packages
PY=$(choose_python)
install_python_packages "$PY"
say "testing with $("$PY" -c 'import sys; print(sys.executable, sys.version.split()[0])')"

# On a terminal, --foreground lets Ctrl-C reach pytest.
foreground=()
[ -t 0 ] && foreground=(--foreground)
status=0
timeout "${foreground[@]}" --kill-after=30 "$SUITE_TIMEOUT" \
    "$PY" -m pytest tests -q --timeout="$TEST_TIMEOUT" "$@" </dev/null || status=$?
case $status in
    0) ;;
    5) say "pytest collected no tests: that is a failure"; status=1 ;;
    124) say "the suite ran longer than ${SUITE_TIMEOUT}s and was stopped" ;;
    *) say "pytest failed (exit status $status)" ;;
esac
exit "$status"
