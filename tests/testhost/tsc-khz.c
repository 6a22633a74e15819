/* Prints this host's TSC frequency in kHz, measured against CLOCK_MONOTONIC_RAW over 100 ms.
 * L1 under TCG reads the host's TSC; without tsc_early_khz= its PIT calibration fails on a busy host
 * and KVM inside L1 hangs (see docs/testhost.md). */
#include <stdio.h>
#include <time.h>
#include <x86intrin.h>

static double ns_between(struct timespec a, struct timespec b) {
    return (double)(b.tv_sec - a.tv_sec) * 1e9 + (double)(b.tv_nsec - a.tv_nsec);
}

int main(void) {
    struct timespec a, b;
    clock_gettime(CLOCK_MONOTONIC_RAW, &a);
    unsigned long long t0 = __rdtsc();
    do {
        clock_gettime(CLOCK_MONOTONIC_RAW, &b);
    } while (ns_between(a, b) < 100e6);
    unsigned long long t1 = __rdtsc();
    printf("%.0f\n", (double)(t1 - t0) / ns_between(a, b) * 1e6);
    return 0;
}
