"""A guest workload for upgrade tests: verified O_DIRECT write/read loops on NBD devices.

    script = loop_script(attachments, stop_offset)   # the guest's /test.sh
    rounds = parse_rounds(console_text)              # what the loops reported so far

Each attachment is (device, nbd-client options, region offset). Its loop
writes a 256 KiB patterned block with O_DIRECT and an fsync (a FLUSH), reads
it back with O_DIRECT and compares, round after round, into one of SLOTS
slots of its region. Every round prints one QCOWNBD-ROUND line: the host
follows progress on the serial console and learns which pattern each slot
held when its last write was acknowledged. The loops run concurrently until
the host writes the stop mark (STOP_BYTE) at stop_offset through any NBD
client; then the guest prints the kernel's NBD messages (QCOWNBD-DMESG) and
detaches.
"""

import re
from dataclasses import dataclass

from .guest import nbd_address

BLOCK = 256 << 10
SLOTS = 4
STOP_BYTE = 0x53
# A bound on the loops should the host never send the stop mark.
LOOP_LIMIT_SECONDS = 400

_SCRIPT = r"""
HOST=@HOST@
fail() { echo "QCOWNBD-FAIL $1"; exit 1; }
now() { cut -d' ' -f1 /proc/uptime; }
attach() {  # attach DEVICE [nbd-client options...]
    dev=$1; shift
    nbd-client -N disk "$@" $HOST 10809 $dev || fail "connect $dev $*"
    # In ioctl mode a forked child finishes the setup: wait for the size.
    for i in $(seq 100); do
        [ "$(cat /sys/block/${dev#/dev/}/size)" != 0 ] && return
        sleep 0.1
    done
    fail "size of $dev"
}
loop() {  # loop INDEX DEVICE REGION-IN-BLOCKS: rounds until /tmp/stop exists
    idx=$1 dev=$2 region=$3 round=0
    while [ ! -e /tmp/stop ]; do
        slot=$((round % @SLOTS@))
        value=$((idx * 64 + 1 + round % 60))  # consecutive writes to a slot differ
        head -c @BLOCK@ /dev/zero | tr '\0' "$(printf '\\%03o' $value)" > /tmp/pattern$idx
        start=$(now)
        if ! dd if=/tmp/pattern$idx of=$dev bs=64k seek=$(( (region + slot) * @UNITS@ )) \
                oflag=direct conv=notrunc,fsync 2>/tmp/dd$idx; then
            status=write-error
        elif ! dd if=$dev bs=64k skip=$(( (region + slot) * @UNITS@ )) count=@UNITS@ \
                iflag=direct 2>/tmp/dd$idx | cmp -s - /tmp/pattern$idx; then
            status=read-error
        else
            status=ok
        fi
        echo "QCOWNBD-ROUND $idx $round $slot $value $start $(now) $status"
        [ $status = ok ] || sed "s/^/QCOWNBD-DD $idx /" /tmp/dd$idx
        round=$((round + 1))
    done
}
@ATTACH@
echo "QCOWNBD-ATTACHED $(now)"
@LOOPS@
stop_mark=$(printf '\\%03o' @STOP_BYTE@)
while :; do
    mark=$(dd if=/dev/nbd0 bs=4k skip=@STOP_BLOCK@ count=1 iflag=direct 2>/dev/null \
           | head -c 4 | tr "$stop_mark" S)
    [ "$mark" = SSSS ] && break
    uptime=$(now)
    [ ${uptime%.*} -gt @LIMIT@ ] && echo "QCOWNBD-FAIL no stop mark" && break
    sleep 0.5
done
touch /tmp/stop
wait
echo "QCOWNBD-STOPPED $(now)"
dmesg | grep -i nbd | sed 's/^/QCOWNBD-DMESG /'
@DETACH@
"""


def loop_script(attachments, stop_offset: int, host: str = nbd_address(0)) -> str:
    """The guest's /test.sh: attach each (device, options, region_offset) to the
    server at `host`, loop, stop.

    The first attachment also carries the stop-mark poll.
    """
    attach = "\n".join(f"attach {dev} {opts}".rstrip() for dev, opts, _ in attachments)
    loops = "\n".join(f"loop {idx} {dev} {offset // BLOCK} &"
                      for idx, (dev, _, offset) in enumerate(attachments))
    detach = "\n".join(f"nbd-client -d {dev} || fail 'detach {dev}'"
                       for dev, _, _ in attachments)
    for _, _, offset in attachments:
        assert offset % BLOCK == 0, "regions are whole blocks"
    assert stop_offset % 4096 == 0
    replacements = {"@HOST@": host, "@SLOTS@": str(SLOTS), "@BLOCK@": str(BLOCK),
                    "@UNITS@": str(BLOCK // (64 << 10)), "@ATTACH@": attach,
                    "@LOOPS@": loops, "@DETACH@": detach, "@STOP_BYTE@": str(STOP_BYTE),
                    "@STOP_BLOCK@": str(stop_offset // 4096),
                    "@LIMIT@": str(LOOP_LIMIT_SECONDS)}
    script = _SCRIPT
    for key, value in replacements.items():
        script = script.replace(key, value)
    return script


@dataclass(frozen=True)
class Round:
    """One round of one guest loop, as it reported it."""
    loop: int
    number: int
    slot: int
    value: int
    start: float   # guest uptime, seconds
    end: float
    status: str    # ok | write-error | read-error

    @property
    def seconds(self) -> float:
        """How long the round took in the guest."""
        return self.end - self.start


_ROUND = re.compile(r"QCOWNBD-ROUND (\d+) (\d+) (\d+) (\d+) ([\d.]+) ([\d.]+) ([a-z-]+)\r?$",
                    re.M)


def parse_rounds(console: str) -> list[Round]:
    """Every complete QCOWNBD-ROUND line of the console, in order."""
    return [Round(int(m[1]), int(m[2]), int(m[3]), int(m[4]), float(m[5]), float(m[6]), m[7])
            for m in _ROUND.finditer(console)]


def acknowledged(rounds: list[Round]) -> dict[tuple[int, int], int]:
    """(loop, slot) -> the pattern of the slot's last acknowledged write.

    A round that read back wrong still had its write acknowledged.
    """
    last = {}
    for round_ in rounds:
        if round_.status in ("ok", "read-error"):
            last[(round_.loop, round_.slot)] = round_.value
    return last
