# minivmm top-level build. Guest images are built by the scripts in guest/
# and cached outside the clone in $(MINIVMM_CACHE) (default ~/.cache/minivmm),
# keyed by a hash of their inputs; guest/out/ only holds symlinks into it.
#
#   make guest            bzImage, vmlinux, initramfs.cpio, initramfs-vsock.cpio,
#                         probe.elf, minivmm-agent, and on
#                         hosts whose KVM emulates guest kernel code (kvm_pvm)
#                         also vmlinux-emulated and initramfs-check.cpio
#   make guest-emulated   vmlinux-emulated and initramfs-check.cpio, always
#   make guest-acpi       vmlinux-acpi: the emulated kernel with ACPI (always built)
#   make test             the test suite
#   make fuzz             the virtqueue engine fuzzer (FUZZ_SECONDS=300)
#   make bench            minivmm next to QEMU (bench/run.py; BENCH_ARGS=--reps N)
#   make bench-smoke      every benchmark once, tiny sizes (CI: checks it still runs)
#   make hwvirt           guest/out/hwvirt/: L1 for the hardware-virtualization tier
#                         (Debian's stock kernel + initramfs; guest/hwvirt/build.sh)
#   make test-hwvirt      the tests marked hwvirt: inside L1 (nested SVM under QEMU
#                         TCG, guest/hwvirt/run.py) unless this host's KVM is hardware
#                         virtualization; HWVIRT_TESTS=tests/hwvirt/...::test_x for one
#   make clean            remove guest/out/ (the cache stays; delete
#                         ~/.cache/minivmm to rebuild from scratch)

OUT := $(abspath guest/out)
PYTHON ?= python3

.PHONY: all guest guest-linux guest-initramfs guest-probe guest-emulated test clean

all: guest

guest: guest-linux guest-initramfs guest-initramfs-check guest-initramfs-vsock guest-probe guest-agent
	@if guest/kvm-emulates-kernel.sh -v; then $(MAKE) --no-print-directory guest-emulated; fi
	$(MAKE) --no-print-directory guest-acpi

guest-linux:
	guest/build-kernel.sh minimal $(OUT)

guest-initramfs:
	guest/build-initramfs.sh busybox $(OUT)

guest-probe:
	$(MAKE) -C guest/probe OUT=$(OUT)

# Kernel builds one after the other: each already uses both cores.
guest-emulated: guest-initramfs-check
	guest/build-kernel.sh emulated $(OUT)

guest-initramfs-check:
	guest/build-initramfs.sh check $(OUT)

guest-initramfs-vsock:
	guest/build-initramfs.sh vsock $(OUT)

guest-acpi:
	guest/build-kernel.sh acpi $(OUT)

.PHONY: guest-initramfs-check guest-initramfs-vsock guest-acpi guest-agent

# The guest agent of `minivmm exec` (guest/agent/README.md).
guest-agent:
	guest/agent/build.sh $(OUT)

test:
	$(PYTHON) -m pytest

# The hardware-virtualization tier (README "The hardware-virtualization test tier").
.PHONY: hwvirt test-hwvirt
hwvirt:
	guest/hwvirt/build.sh $(OUT)

HWVIRT_TESTS ?= tests/hwvirt
HWVIRT_TIMEOUT ?= 1500
HWVIRT_PYTEST = $(PYTHON) -m pytest -m hwvirt -p no:cacheprovider --durations=5 $(HWVIRT_TESTS)
test-hwvirt: hwvirt
	@if [ -e /dev/kvm ] && ! guest/kvm-emulates-kernel.sh; then \
	    echo "test-hwvirt: this host's KVM is hardware virtualization: running directly"; \
	    $(HWVIRT_PYTEST); \
	elif ! command -v qemu-system-x86_64 >/dev/null; then \
	    echo "test-hwvirt: SKIPPED: no hardware-virtualization /dev/kvm here and no" \
	         "qemu-system-x86_64 to nest one (install the Debian package qemu-system-x86)"; \
	else \
	    echo "test-hwvirt: running in L1 (nested SVM under QEMU TCG; guest/hwvirt/run.py)"; \
	    $(PYTHON) guest/hwvirt/run.py --timeout $(HWVIRT_TIMEOUT) -- $(HWVIRT_PYTEST) --basetemp=/tmp/pytest-hwvirt; \
	fi

# The virtqueue engine's Hypothesis fuzzer, for longer runs than CI's (FUZZ_SECONDS=600).
FUZZ_SECONDS ?= 300
.PHONY: fuzz
fuzz:
	$(PYTHON) -m tests.virtio.fuzz_queue --seconds $(FUZZ_SECONDS)

.PHONY: bench bench-smoke
bench:
	$(PYTHON) -m bench $(BENCH_ARGS)

bench-smoke:
	$(PYTHON) -m bench --smoke

clean:
	rm -rf guest/out
