/* A guest /init that proves a kernel reached userspace: prints a marker line with the kernel's uptime
 * and `uname -r` on the console, then reboots (the VMM, or QEMU with -no-reboot, then exits).
 * Used by the test-host self-test and as the "boot to init" workload for QEMU and husk-vmm benchmarks. */
#include <fcntl.h>
#include <stdio.h>
#include <sys/reboot.h>
#include <sys/utsname.h>
#include <time.h>
#include <unistd.h>

int main(void) {
    struct timespec ts;
    struct utsname u;
    clock_gettime(CLOCK_BOOTTIME, &ts);
    uname(&u);
    int fd = open("/dev/console", O_WRONLY);
    if (fd >= 0) {
        dprintf(fd, "HUSK-GUEST-INIT release=%s uptime_ms=%ld\n", u.release,
                (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000);
        fsync(fd);
    }
    sync();
    reboot(RB_AUTOBOOT);
    for (;;) pause();
}
