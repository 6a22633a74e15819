#!/bin/busybox sh
# /init of the benchmark image (never shipped; built by tests/images/bench-initrd.sh): runs the
# workloads named by `bench_*` variables on the kernel command line (the kernel hands `name=value`
# parameters it does not know to init as environment variables; init arguments after "--" would not
# work under QEMU, which appends its virtio_mmio.device= entries after the given command line), prints
# `BENCH <name> <data>` lines on the console, and reboots. The same image boots under husk-vmm and
# under QEMU, so both run identical guest code. Disks are found by serial, not by name (the two VMMs
# may enumerate them differently): `bench-tools` (read-only erofs with fio, iperf3 and their
# libraries) and `bench-data` (the disk fio reads).
#   bench_blk=1          fio sequential and random reads on the bench-data disk
#   bench_ip=A.B.C.D     guest address (/24) on eth0, then iperf3 to bench_server=A.B.C.D
#   bench_tag=TAG        mount the virtio-fs share TAG and run bench-fsprobe on big and many/
#   bench_secs=N         seconds per fio/iperf3 run (default 5)
/bin/busybox --install -s /bin
export PATH=/bin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp

blk=${bench_blk:--} ip=${bench_ip:--} server=${bench_server:--} tag=${bench_tag:--} secs=${bench_secs:-5}

by_serial() {
    for s in /sys/block/vd*/serial; do
        [ "$(cat "$s")" = "$1" ] && { d=${s%/serial}; echo "/dev/${d##*/}"; return; }
    done
}
tools=$(by_serial bench-tools)
if [ -n "$tools" ] && mkdir -p /tools && mount -t erofs -o ro "$tools" /tools; then
    ln -s /tools/lib /lib && ln -s /tools/lib64 /lib64 && ln -s /tools/usr /usr
else
    echo "BENCH tools missing (no disk with serial bench-tools)"
fi
disk=$(by_serial bench-data)

if [ "$blk" != - ]; then
    # Direct I/O so the guest page cache never answers; libaio with a few requests in flight, as a
    # database or an image pull would issue them. --thread: no SysV shm segments for job state.
    common="--filename=$disk --direct=1 --ioengine=libaio --thread --time_based --runtime=$secs --ramp_time=1 --size=256M --minimal"
    echo "BENCH blk_seqread $(fio --name=seqread --rw=read --bs=1M --iodepth=4 $common 2>&1 | tr '\n' ' ')"
    echo "BENCH blk_randread $(fio --name=randread --rw=randread --bs=4k --iodepth=16 $common 2>&1 | tr '\n' ' ')"
fi

if [ "$ip" != - ]; then
    ip link set lo up
    ip link set eth0 up
    ip addr add "$ip/24" dev eth0
    # The host started the iperf3 server before the VM; it reports the received rate itself.
    if iperf3 -c "$server" -t "$secs" -f m >/tmp/iperf.log 2>&1; then
        echo "BENCH net_tcp ok $(grep sender /tmp/iperf.log | tr -s ' ')"
    else
        echo "BENCH net_tcp failed $(tail -n 3 /tmp/iperf.log | tr '\n' ' ')"
    fi
fi

if [ "$tag" != - ]; then
    mkdir -p /mnt
    # Cold: first access after the mount, nothing of the share is in the guest's caches yet.
    if mount -t virtiofs "$tag" /mnt; then
        echo "BENCH fs_read $(fsprobe read /mnt/big 2>&1)"
        echo "BENCH fs_stat $(fsprobe stat /mnt/many 2>&1)"
        umount /mnt
        # Again, with the share cold once more (unmounted, caches dropped) but the guest RAM the
        # first read filled already touched: tells the cost of the share from the cost of first
        # touches of guest memory, which under nesting are expensive nested page faults.
        sync
        echo 3 >/proc/sys/vm/drop_caches
        if mount -t virtiofs "$tag" /mnt; then
            echo "BENCH fs_read_again $(fsprobe read /mnt/big 2>&1)"
            umount /mnt
        else
            echo "BENCH fs_read_again mount failed"
        fi
    else
        echo "BENCH fs_read mount failed"
    fi
fi

echo "BENCH-DONE"
reboot -f
