#!/bin/busybox sh
# /init of the device test image (busybox-based; never shipped): runs the scenario named by the first
# init argument (kernel command line after "--"), prints RESULT lines on the console, and reboots.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

blk() {
    # vda: a read-write disk with "host-wrote-this!" in sector 0; vdb: a read-only disk.
    echo "RESULT serial vda=$(cat /sys/block/vda/serial) vdb=$(cat /sys/block/vdb/serial)"
    echo "RESULT ro vda=$(cat /sys/block/vda/ro) vdb=$(cat /sys/block/vdb/ro)"
    echo "RESULT size vda=$(cat /sys/block/vda/size)"
    echo "RESULT read $(dd if=/dev/vda bs=512 count=1 2>/dev/null | head -c 16)"
    if echo "guest-wrote-this" | dd of=/dev/vda bs=512 seek=1 conv=sync,fsync 2>/dev/null; then
        echo "RESULT write ok"
    fi
    if dd if=/dev/zero of=/dev/vdb bs=512 count=1 conv=fsync 2>/dev/null; then
        echo "RESULT rowrite succeeded"
    else
        echo "RESULT rowrite refused"
    fi
    # A larger transfer across many descriptors.
    dd if=/dev/vda of=/dev/null bs=1M count=4 2>/dev/null && echo "RESULT bigread ok"
}

net() {
    ip link set lo up
    ip link set eth0 up
    ip addr add "$1/24" dev eth0
    echo "RESULT mac $(cat /sys/class/net/eth0/address)"
    if ping -c 3 -W 3 "$2" >/dev/null 2>&1; then echo "RESULT ping ok"; else echo "RESULT ping failed"; fi
}

# Waits up to $2 tenths of a second for the test `$1` to succeed.
wait_for() {
    i=0
    while ! eval "$1" && [ "$i" -lt "$2" ]; do sleep 0.1; i=$((i + 1)); done
    eval "$1"
}

fs() {
    # $1: tag of the read-write share, $2: tag of the read-only share. The host put before.txt and
    # gone/ in the share before boot; after "RESULT fs mounted" it removes gone/ and adds late/hello.
    # It also planted symlinks that point outside the share (to a file holding a secret marker).
    mkdir -p /mnt /ro /etc
    echo "guest-passwd-line" >/etc/passwd
    if mount -t virtiofs "$1" /mnt && mount -t virtiofs "$2" /ro; then
        echo "RESULT fs mounted"
    else
        echo "RESULT fs mount failed"
    fi
    echo "RESULT before $(cat /mnt/before.txt)"
    if wait_for '[ -f /mnt/late/hello ]' 600; then echo "RESULT late $(cat /mnt/late/hello)"; fi
    if wait_for '[ ! -e /mnt/gone ]' 100; then echo "RESULT removed gone"; fi
    if echo "guest-wrote-this" >/mnt/from-guest.txt && sync; then echo "RESULT write ok"; fi
    # Escapes. The guest resolves '..' and symlinks itself, in its own namespace: each attempt must
    # end in the guest's own files or fail, never print the host's marker.
    echo "RESULT dotdot $(cat /mnt/../secret.txt /mnt/../../secret.txt /mnt/late/../../secret.txt 2>&1 | tr '\n' ' ')"
    echo "RESULT abslink $(cat /mnt/abs-link 2>&1 | tr '\n' ' ')"
    echo "RESULT rellink $(cat /mnt/rel-link 2>&1 | tr '\n' ' ')"
    echo "RESULT passwdlink $(cat /mnt/passwd-link 2>&1)"
    echo "RESULT proclink $(cat /mnt/proc-link 2>&1 | tr '\n' ' ')"
    echo "RESULT procroot $(cat /proc/self/root/mnt/../secret.txt 2>&1 | tr '\n' ' ')"
    if ln /etc/passwd /mnt/cross-link 2>/dev/null; then echo "RESULT crosslink made"; else echo "RESULT crosslink refused"; fi
    if ln /mnt/before.txt /mnt/inside-link; then echo "RESULT insidelink ok"; fi
    if ln -s /proc/self/root/etc/hostname /mnt/guest-symlink; then echo "RESULT guestsymlink ok"; fi
    # Read-only share: reads work, every kind of write is refused by the daemon.
    echo "RESULT roread $(cat /ro/keep.txt)"
    ro=refused
    echo x >/ro/new.txt 2>/dev/null && ro=created
    echo x >>/ro/keep.txt 2>/dev/null && ro=appended
    rm /ro/keep.txt 2>/dev/null && ro=removed
    mkdir /ro/dir 2>/dev/null && ro=mkdir
    echo "RESULT rowrite $ro"
    umount /mnt && umount /ro && echo "RESULT umount ok"
}

fsdeath() {
    # The host kills the daemon after "RESULT fs mounted"; the guest leaves the share alone (its
    # requests would wait forever) and the VM must still run to a clean reboot.
    mkdir -p /mnt
    mount -t virtiofs "$1" /mnt && echo "RESULT fs mounted"
    sleep 4
    echo "RESULT still running"
    # No sync: syncfs on the orphaned share would wait for the dead daemon forever.
    echo "HUSK-E2E-DONE"
    reboot -n -f
}

fsbench() {
    # Rough timings of a share for docs/shared-fs.md: sequential read of /mnt/big, lstat of every
    # file in /mnt/many (cold, then warm), in milliseconds.
    mkdir -p /mnt
    mount -t virtiofs "$1" /mnt || { echo "RESULT fs mount failed"; return; }
    # Milliseconds since boot, from /proc/uptime (10 ms resolution; busybox date has no %N).
    ms() { read -r up _ </proc/uptime; echo $((${up%.*} * 1000 + 1${up#*.} * 10 - 1000)); }
    t0=$(ms); cat /mnt/big >/dev/null; t1=$(ms)
    ls -l /mnt/many >/dev/null; t2=$(ms)
    ls -l /mnt/many >/dev/null; t3=$(ms)
    echo "RESULT fsbench read_ms=$((t1 - t0)) stat_cold_ms=$((t2 - t1)) stat_warm_ms=$((t3 - t2))"
    mount -t tmpfs tmpfs /tmp 2>/dev/null || { mkdir -p /tmp && mount -t tmpfs tmpfs /tmp; }
    cp -r /mnt/many /tmp/many; t0=$(ms); ls -l /tmp/many >/dev/null; t1=$(ms)
    echo "RESULT guest-tmpfs stat_ms=$((t1 - t0))"
    umount /mnt
}

case "$1" in
    blk) blk ;;
    net) net "$2" "$3" ;;
    fs) fs "$2" "$3" ;;
    fsdeath) fsdeath "$2" ;;
    fsbench) fsbench "$2" ;;
    *) echo "RESULT unknown scenario '$1'" ;;
esac
echo "HUSK-E2E-DONE"
sync
reboot -f
