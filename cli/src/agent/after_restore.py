# Run as root (sudo) in a guest just restored from a snapshot, by
# `keystone agent start` (resume) and `keystone agent fork`:
#   python3 - <host clock, Unix seconds> [hostname=NAME] [mac=MAC]
# with 64 random bytes from the host on stdin. The guest's clock is the
# snapshot's, and its RNG state is shared with every other restore of the
# same snapshot: both are set from the host before anything else runs.
import fcntl
import os
import socket
import struct
import subprocess
import sys
import time

RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)

seed = sys.stdin.buffer.read(64)
if len(seed) != 64:
    sys.exit("after-restore: expected 64 bytes of seed on stdin")
time.clock_settime(time.CLOCK_REALTIME, float(sys.argv[1]))
fd = os.open("/dev/random", os.O_WRONLY)
# Credited to the input pool, then the CRNG is rekeyed from it at once
# (not at its next periodic reseed).
fcntl.ioctl(fd, RNDADDENTROPY, struct.pack("ii", 8 * len(seed), len(seed)) + seed)
fcntl.ioctl(fd, RNDRESEEDCRNG)
os.close(fd)


def replace(path, text):
    with open(path + ".keystone-tmp", "w") as f:
        f.write(text)
    os.replace(path + ".keystone-tmp", path)


for arg in sys.argv[2:]:
    key, _, value = arg.partition("=")
    if key == "hostname":
        socket.sethostname(value)
        replace("/etc/hostname", value + "\n")
        with open("/etc/hosts") as f:
            hosts = [l for l in f.read().splitlines() if not l.startswith("127.0.1.1")]
        replace("/etc/hosts", "\n".join(hosts + ["127.0.1.1 " + value]) + "\n")
    elif key == "mac":
        # The virtio NIC (the only interface with a device behind it).
        for ifc in sorted(os.listdir("/sys/class/net")):
            if os.path.exists("/sys/class/net/%s/device" % ifc):
                subprocess.run(["ip", "link", "set", "dev", ifc, "address", value], check=True)
    else:
        sys.exit("after-restore: unknown argument %r" % arg)
print("restored")
