#!/bin/bash
# Builds the benchmark guest image: an initrd (tests/images/bench-guest.sh as /init, busybox,
# bench-fsprobe) and a read-only erofs "tools" disk with fio, iperf3 and every shared library they
# need. Runs INSIDE the test host (the Makefile calls it through tests/testhost/run): fio, iperf3 and
# mkfs.erofs come from L1's Debian root filesystem (tests/testhost/packages), and the libraries are
# the ones `ldd` resolves there, kept at the same paths so the guest's ld.so finds them without an
# ld.so.cache once the guest links /lib, /lib64 and /usr to the mounted disk.
#
# Why a disk and not the initrd: fio's Debian build links ~85 MB of libraries (ceph, gluster, ICU).
# In an initrd the guest kernel unpacks all of it at every boot, which took ~40 s per boot in the
# nested test host; from a disk the guest reads only the pages the loader touches.
#   bench-initrd.sh INITRD_OUT TOOLS_OUT FSPROBE
set -euo pipefail
initrd_out=$1 tools_out=$2 fsprobe=$3
root=$(cd "$(dirname "$0")/../.." && pwd -P)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

"$root/target/release/husk-rootfs-builder" initrd --init "$root/tests/images/bench-guest.sh" \
    --add /bin/busybox:bin/busybox --add "$fsprobe:bin/fsprobe" --out "$initrd_out"

mkdir -p "$stage/tree/usr/bin"
cp /usr/bin/fio /usr/bin/iperf3 "$stage/tree/usr/bin/"
n=0
for lib in $(ldd /usr/bin/fio /usr/bin/iperf3 | awk '/=> \//{print $3} /^\t\/lib64\//{print $1}' | sort -u); do
    n=$((n + 1))
    mkdir -p "$stage/tree$(dirname "$lib")"
    cp "$(readlink -f "$lib")" "$stage/tree$lib"
done
# Fixed timestamps and UUID: the same inputs give the same image.
find "$stage/tree" -exec touch -h -d @0 {} +
mkfs.erofs --quiet --all-root -T0 -U 00000000-0000-0000-0000-00000000b0b0 "$tools_out.tmp" "$stage/tree"
mv "$tools_out.tmp" "$tools_out"
echo "bench tools disk $tools_out: fio, iperf3 and $n libraries, $(($(stat -c %s "$tools_out") / 1024)) KiB"
