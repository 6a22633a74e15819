/* The shared-fs benchmark probe of `make bench`: the same static binary runs inside the guest (on the
 * virtio-fs mount) and directly in the test host (on the shared directory itself), so both sides are
 * measured by identical code with a nanosecond clock (busybox has no sub-10 ms timer).
 *
 *   bench-fsprobe read FILE   sequential read of FILE in 1 MiB read(2) calls
 *   bench-fsprobe stat DIR    lstat(2) of every entry of DIR (like `ls -l`)
 *
 * Prints one line: `FSPROBE <mode> bytes=<n> files=<n> ns=<elapsed>`; exit status 1 on any error. */
#define _GNU_SOURCE
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static long long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int do_read(const char *path) {
    enum { BS = 1 << 20 };
    char *buf = malloc(BS);
    if (!buf) return 1;
    long long t0 = now_ns();
    int fd = open(path, O_RDONLY);
    if (fd < 0) { perror(path); return 1; }
    long long total = 0;
    for (;;) {
        ssize_t n = read(fd, buf, BS);
        if (n < 0) { perror("read"); return 1; }
        if (n == 0) break;
        total += n;
    }
    close(fd);
    long long t1 = now_ns();
    printf("FSPROBE read bytes=%lld files=1 ns=%lld\n", total, t1 - t0);
    return 0;
}

static int do_stat(const char *path) {
    long long t0 = now_ns();
    DIR *d = opendir(path);
    if (!d) { perror(path); return 1; }
    int dfd = dirfd(d);
    long long files = 0;
    struct dirent *e;
    struct stat st;
    while ((e = readdir(d)) != NULL) {
        if (strcmp(e->d_name, ".") == 0 || strcmp(e->d_name, "..") == 0) continue;
        if (fstatat(dfd, e->d_name, &st, AT_SYMLINK_NOFOLLOW) != 0) { perror(e->d_name); return 1; }
        files++;
    }
    closedir(d);
    long long t1 = now_ns();
    printf("FSPROBE stat bytes=0 files=%lld ns=%lld\n", files, t1 - t0);
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s read FILE | stat DIR\n", argv[0]);
        return 2;
    }
    int rc = strcmp(argv[1], "read") == 0   ? do_read(argv[2])
             : strcmp(argv[1], "stat") == 0 ? do_stat(argv[2])
                                            : 2;
    fflush(stdout);
    return rc;
}
