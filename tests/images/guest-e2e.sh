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

case "$1" in
    blk) blk ;;
    net) net "$2" "$3" ;;
    *) echo "RESULT unknown scenario '$1'" ;;
esac
echo "HUSK-E2E-DONE"
sync
reboot -f
