# Husk: `make demo` boots a microVM and talks to its agent; `make test` installs what is missing and runs
# every check. Kernel and image builds are cached in $(HUSK_CACHE) (default ~/.cache/husk).
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
export HUSK_CACHE ?= $(HOME)/.cache/husk

CARGO ?= cargo
HOST_TARGET := x86_64-unknown-linux-gnu
AGENT := target/$(HOST_TARGET)/release/husk-agent
VMM := target/release/husk-vmm
ROOTFS_BUILDER := target/release/husk-rootfs-builder
TESTHOST := tests/testhost/run

# Debian packages the build and the tests need on the host (the L1 test host brings its own).
APT_PACKAGES := linux-source-6.1 flex bison bc libelf-dev libssl-dev cpio xz-utils gcc libc6-dev make \
	qemu-system-x86 debootstrap e2fsprogs erofs-utils jq busybox-static libseccomp-dev libcap-ng-dev \
	protobuf-compiler

# virtiofsd serves virtio-fs shares (vhost-user); built from crates.io once, cached outside the checkout.
VIRTIOFSD_VERSION := 1.14.0
VIRTIOFSD := $(HUSK_CACHE)/virtiofsd-$(VIRTIOFSD_VERSION)/bin/virtiofsd

.PHONY: all deps build agent guest testhost virtiofsd images lint unit e2e test bench bench-image demo fuzz install clean

all: build

deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
		dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "[deps] installing:" $$missing; \
		apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing >/dev/null; \
	else echo "[deps] all Debian packages present"; fi
	@rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt

build:
	$(CARGO) build --release --workspace --bins

# The agent is PID 1 of the guest: a static binary (crt-static on the gnu target; --target keeps the
# flag away from build scripts and proc macros).
agent:
	RUSTFLAGS='-C target-feature=+crt-static' $(CARGO) build --release --target $(HOST_TARGET) -p husk-agent
	@file $(AGENT) | grep -qE 'static(-pie)? linked' || { echo "$(AGENT) is not static" >&2; exit 1; }

# Guest kernel and the guest image (agent as /init), twice from the same files: rootfs.erofs, the
# read-only root on virtio-blk that pods boot from (docs/guest-image.md), and initrd.img, the
# alternative. Both are rebuilt every time (well under a second; reproducible bytes).
guest: agent build
	guest-kernel/build.sh guest build/guest guest-kernel/microvm.config guest-kernel/pod.config
	strip -o build/guest/husk-agent $(AGENT)  # symbols would double the guest image
	$(ROOTFS_BUILDER) erofs --init build/guest/husk-agent --out build/guest/rootfs.erofs
	$(ROOTFS_BUILDER) initrd --init build/guest/husk-agent --out build/guest/initrd.img

# The vhost-user-fs daemon, copied where the test host (L1) sees it through the project share.
virtiofsd:
	@[ -x $(VIRTIOFSD) ] || $(CARGO) install --locked virtiofsd --version $(VIRTIOFSD_VERSION) \
		--root $(HUSK_CACHE)/virtiofsd-$(VIRTIOFSD_VERSION)
	@mkdir -p build/testhost
	install -m 0755 $(VIRTIOFSD) build/testhost/virtiofsd

# Installs Husk on this node, like runc: the shim on containerd's PATH, the VMM, virtiofsd, the guest kernel
# and image, and a default /etc/husk/config.toml (kept if present). Then select the runtime with
# `ctr run --runtime io.containerd.husk.v2` or a CRI runtime with runtime_type "io.containerd.husk.v2".
PREFIX ?= /usr/local
install: guest virtiofsd
	install -D -m 0755 target/release/containerd-shim-husk-v2 $(DESTDIR)$(PREFIX)/bin/containerd-shim-husk-v2
	install -D -m 0755 $(VMM) $(DESTDIR)$(PREFIX)/bin/husk-vmm
	install -D -m 0755 $(VIRTIOFSD) $(DESTDIR)$(PREFIX)/libexec/husk/virtiofsd
	install -D -m 0644 build/guest/vmlinux $(DESTDIR)/usr/share/husk/vmlinux
	install -D -m 0644 build/guest/rootfs.erofs $(DESTDIR)/usr/share/husk/rootfs.erofs
	install -D -m 0644 build/guest/initrd.img $(DESTDIR)/usr/share/husk/initrd.img
	@if [ ! -e $(DESTDIR)/etc/husk/config.toml ]; then \
		mkdir -p $(DESTDIR)/etc/husk; \
		printf '%s\n' '# Husk node configuration (docs/shim.md lists every key).' \
			'kernel = "/usr/share/husk/vmlinux"' \
			'# The guest boots from rootfs (read-only erofs disk) when it exists, else from initrd.' \
			'rootfs = "/usr/share/husk/rootfs.erofs"' 'initrd = "/usr/share/husk/initrd.img"' \
			'vmm = "$(PREFIX)/bin/husk-vmm"' 'virtiofsd = "$(PREFIX)/libexec/husk/virtiofsd"' \
			'vcpus = 1' 'memory_mib = 256' > $(DESTDIR)/etc/husk/config.toml; \
		echo "wrote $(DESTDIR)/etc/husk/config.toml"; \
	else echo "kept $(DESTDIR)/etc/husk/config.toml"; fi

# The nested test host (L1): its kernel, its Debian root filesystem, and the marker-init guest image.
testhost: build virtiofsd
	guest-kernel/build.sh l1 build/testhost guest-kernel/microvm.config tests/testhost/l1-kernel.config
	tests/testhost/build-rootfs.sh build/testhost/rootfs.ext4
	gcc -static -Os -o build/testhost/marker-init tests/testhost/marker-init.c
	$(ROOTFS_BUILDER) initrd --init build/testhost/marker-init --out build/testhost/marker-initrd.img
	$(ROOTFS_BUILDER) initrd --init tests/images/guest-e2e.sh --add /bin/busybox:bin/busybox \
		--out build/testhost/e2e-initrd.img

# Offline OCI images for the containerd tests and the demo (`ctr images import`): busybox-static from
# the host (make deps) with its applets as hard links, users root and user (1000), reproducible.
# Rebuilt every time like the initrds above: it takes well under a second, and the bytes only change
# when busybox does.
images: build
	$(ROOTFS_BUILDER) oci-image --busybox /bin/busybox --name docker.io/library/busybox:latest --cmd sh \
		--out build/images/busybox-oci.tar

lint:
	$(CARGO) fmt --all --check
	$(CARGO) clippy --workspace --all-targets --release -- -D warnings

# Everything that runs without booting a VM (the husk-tests integration tests boot VMs: see e2e).
unit:
	$(CARGO) test --release --workspace --exclude husk-tests
	$(CARGO) test --release -p husk-tests --lib --bins

# Everything that boots a VM runs in one test-host boot: the self-test, then the end-to-end tests.
e2e: guest testhost images
	e2e=$$($(CARGO) test --release -p husk-tests --no-run --message-format=json 2>/dev/null | \
		jq -r 'select(.profile.test == true and .target.kind == ["test"] and .executable != null) | .executable' | tr '\n' ' '); \
	cgroup=$$($(CARGO) test --release -p husk-agent --test container_cgroup --no-run --message-format=json 2>/dev/null | \
		jq -r 'select(.target.kind == ["test"] and .executable != null) | .executable'); \
	[ -n "$$e2e" ] && [ -x "$$cgroup" ] || { echo "e2e: the test binaries did not build" >&2; exit 1; }; \
	HUSK_E2E_CGROUP_TEST=$$cgroup $(TESTHOST) tests/run-in-testhost $$e2e

test: deps lint unit e2e
	@echo "make test: all checks passed"

# The benchmark guest image (tests/images/bench-*): an initrd (busybox, bench-fsprobe) and a read-only
# tools disk (fio, iperf3 and their libraries), assembled inside the test host from L1's Debian
# packages; rebuilt only when one of their inputs changes.
BENCH_INITRD := build/testhost/bench-initrd.img
BENCH_TOOLS := build/testhost/bench-tools.erofs
BENCH_FSPROBE := build/testhost/bench-fsprobe

$(BENCH_FSPROBE): tests/images/bench-fsprobe.c
	@mkdir -p $(@D)
	gcc -static -O2 -Wall -o $@ $<

$(BENCH_INITRD): tests/images/bench-initrd.sh tests/images/bench-guest.sh $(BENCH_FSPROBE) \
		tests/testhost/packages $(ROOTFS_BUILDER)
	$(TESTHOST) tests/images/bench-initrd.sh $(CURDIR)/$@ $(CURDIR)/$(BENCH_TOOLS) $(CURDIR)/$(BENCH_FSPROBE)

bench-image: build testhost $(BENCH_INITRD)

# Five device rounds take ~25 min in L1, and each failed attempt a few more: L1 gets 90 min. L1's
# own kernel has died mid-run under TCG (testhost status 125): then a new L1 boots, up to 3 in all,
# and the device rounds go on from the ones saved in BENCH_PROGRESS (tests/src/bench/devices.rs).
BENCH_PROGRESS := target/bench/devices-progress.json
bench: guest testhost $(BENCH_INITRD)
	@mkdir -p target/bench && rm -f $(BENCH_PROGRESS)
	@commit=$$(git describe --always --dirty 2>/dev/null || echo unknown); \
	for boot in 1 2 3; do \
		HUSK_BENCH_PROGRESS=$(BENCH_PROGRESS) HUSK_BENCH_COMMIT=$$commit \
		HUSK_TESTHOST_TIMEOUT=$${HUSK_TESTHOST_TIMEOUT:-5400} $(TESTHOST) target/release/husk-bench --out target/bench/results.json; \
		status=$$?; [ $$status -eq 125 ] || exit $$status; \
		echo "[bench] L1 died (testhost status 125) after boot $$boot of 3" >&2; \
	done; exit 125

demo: deps guest testhost images
	$(TESTHOST) target/release/husk-demo

# libFuzzer targets for the guest-controlled virtio parsers (fuzz/, its own cargo workspace), each
# run for FUZZ_SECONDS. Not part of `make test`. cargo fuzz needs nightly flags: RUSTC_BOOTSTRAP
# lets the stable toolchain accept them. New corpus entries go to a scratch directory (the seeds in
# fuzz/corpus stay as committed); crashes are saved in fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS := chain_reader net_tx net_rx blk_request vsock_tx vhost_fs_replies mmio_transport
CARGO_FUZZ_VERSION := 0.13.2
CARGO_FUZZ := $(HUSK_CACHE)/cargo-fuzz/bin/cargo-fuzz

fuzz:
	@[ -x $(CARGO_FUZZ) ] || $(CARGO) install --locked cargo-fuzz --version $(CARGO_FUZZ_VERSION) \
		--root $(HUSK_CACHE)/cargo-fuzz
	@scratch=$$(mktemp -d -p /dev/shm 2>/dev/null || mktemp -d); trap 'rm -rf "$$scratch"' EXIT; \
	for t in $(FUZZ_TARGETS); do \
		echo "[fuzz] $$t for $(FUZZ_SECONDS)s"; mkdir -p "$$scratch/$$t"; \
		RUSTC_BOOTSTRAP=1 HUSK_FUZZ_SCRATCH="$$scratch" PATH="$(HUSK_CACHE)/cargo-fuzz/bin:$$PATH" $(CARGO) fuzz run $$t \
			"$$scratch/$$t" fuzz/corpus/$$t -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 \
			-print_final_stats=1; \
	done

clean:
	rm -rf build target/bench
