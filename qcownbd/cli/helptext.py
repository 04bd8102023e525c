"""The examples and exit statuses shown under each command's --help.

Keyed by the command line that starts a command ("qcownbd fleet list"), so
that every parser of the `qcownbd` tree finds its own text; qcownbd(8) says
the same at more length.  Every example is a command line the parser takes
(the tests parse each one).
"""

EXIT_STATUS = """exit status:
  0    success
  1    failure: an image, file or config that cannot be used, an image in use,
       a server that cannot start
  2    usage error: an unknown option, a missing or malformed argument
  130  interrupted (Ctrl-C)"""

CHECK_EXIT_STATUS = """exit status (those of qemu-img check):
  0    no errors were found
  1    the check could not run (the image cannot be opened, ...)
  2    corruption was found; also a usage error
  3    leaked clusters only (no harm to data)
  63   the image's format has no metadata to check (raw)
  130  interrupted (Ctrl-C)"""

FORMATS = ("formats: raw, qcow1 (QEMU calls it qcow, and so may you), and auto (probe)\n"
           "where a format is probed by default.")

_EXAMPLES = {
    "qcownbd": """\
  qcownbd serve --demo                      # a demo export on 127.0.0.1:10809
  qcownbd serve disk=/srv/images/disk.qcow
  qcownbd create disk.qcow 10G
  qcownbd info disk.qcow""",
    "qcownbd serve": """\
  qcownbd serve --demo
  qcownbd serve disk.qcow                   # export "disk" on 127.0.0.1:10809
  qcownbd serve --listen 0.0.0.0:10809 vm1=/srv/images/vm1.qcow
  qcownbd serve --read-only base=base.qcow scratch=scratch.raw
  qcownbd serve --format raw --unix /run/qcownbd.sock disk=disk.img
  qcownbd serve --config /etc/qcownbd/exports.toml
  qcownbd serve --fork --pid-file /run/qcownbd.pid disk.qcow   # returns once listening
  qcownbd serve -p 10810 disk.qcow --run 'nbdinfo "$uri"'""",
    "qcownbd create": """\
  qcownbd create disk.qcow 10G              # the bytes qemu-img create -f qcow writes
  qcownbd create -b base.qcow -F qcow1 overlay.qcow   # the size of its backing file
  qcownbd create -f raw scratch.raw 1G""",
    "qcownbd info": """\
  qcownbd info disk.qcow
  qcownbd info --json overlay.qcow
  qcownbd info -U disk.qcow                 # while a VM writes it (may be stale)""",
    "qcownbd map": """\
  qcownbd map disk.qcow
  qcownbd map --json -f qcow overlay.qcow""",
    "qcownbd check": """\
  qcownbd check disk.qcow
  qcownbd check --repair disk.qcow""",
    "qcownbd convert": """\
  qcownbd convert -O qcow1 disk.raw disk.qcow       # zeros skipped, stays sparse
  qcownbd convert -O raw disk.qcow disk.raw
  qcownbd convert -O qcow -B base.qcow vm.raw vm.qcow   # only what differs from base""",
    "qcownbd commit": """\
  qcownbd commit vm1.qcow                   # vm1's writes go into its backing file
  qcownbd commit -F raw overlay.qcow        # the backing file is raw, never probed""",
    "qcownbd status": """\
  qcownbd status                            # the systemd unit's server
  qcownbd status --control /run/qcownbd/control-NAME/socket --json""",
    "qcownbd snapshot": """\
  qcownbd snapshot vm1                      # vm1.qcow stays the live disk, over the snapshot
  qcownbd snapshot --name vm1-before-upgrade.qcow --control /tmp/q.control vm1""",
    "qcownbd upgrade": """\
  qcownbd upgrade                           # after installing a new qcownbd
  qcownbd upgrade --control /tmp/q.control --json""",
    "qcownbd fleet": """\
  qcownbd fleet list /etc/qcownbd/exports.toml
  qcownbd fleet info /etc/qcownbd/exports.toml fleet/vm42
  qcownbd fleet delete /etc/qcownbd/exports.toml vm43
  qcownbd fleet commit /etc/qcownbd/exports.toml vm42 /var/lib/qcownbd/golden-2.qcow""",
    "qcownbd fleet list": """\
  qcownbd fleet list /etc/qcownbd/exports.toml
  qcownbd fleet list --json /var/lib/qcownbd/fleet""",
    "qcownbd fleet info": """\
  qcownbd fleet info /etc/qcownbd/exports.toml vm42
  qcownbd fleet info --json /etc/qcownbd/exports.toml fleet/vm42""",
    "qcownbd fleet delete": """\
  qcownbd fleet delete /etc/qcownbd/exports.toml vm42 vm43""",
    "qcownbd fleet commit": """\
  qcownbd fleet commit /etc/qcownbd/exports.toml vm42 /var/lib/qcownbd/golden-2.qcow
  qcownbd fleet commit -O raw /etc/qcownbd/exports.toml fleet/vm42 golden-2.raw""",
}

_SIGNALS = """signals:
  SIGTERM, SIGINT  stop: answer the requests in flight, commit and close the
                   images, exit 0
  SIGHUP           reload the --config file and reread the TLS certificate files
  SIGUSR2          hand the sockets and clients over to a new server process
                   (as qcownbd upgrade does), which then serves"""

#: what follows the examples, by command (default: EXIT_STATUS)
_AFTER = {
    "qcownbd": f"{FORMATS}\n\n{EXIT_STATUS}\n  (check has exit statuses of its own: "
               "qcownbd check --help)",
    "qcownbd serve": f"{_SIGNALS}\n\n{EXIT_STATUS}\n  with --run: the command's own status "
                     "(128+N when signal N ended it)",
    "qcownbd check": CHECK_EXIT_STATUS,
}


def epilog(command: str) -> str | None:
    """The text under the --help of ``command`` ("qcownbd fleet list"); None for a
    parser that starts no command."""
    examples = _EXAMPLES.get(command)
    if examples is None:
        return None
    return f"examples:\n{examples}\n\n{_AFTER.get(command, EXIT_STATUS)}\n"

