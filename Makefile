# minivmm top-level build. Guest images are built by the scripts in guest/
# and cached outside the clone in $(MINIVMM_CACHE) (default ~/.cache/minivmm),
# keyed by a hash of their inputs; guest/out/ only holds symlinks into it.
#
#   make guest            bzImage, vmlinux, initramfs.cpio, probe.elf, and on
#                         hosts whose KVM emulates guest kernel code (kvm_pvm)
#                         also vmlinux-emulated and initramfs-check.cpio
#   make guest-emulated   vmlinux-emulated and initramfs-check.cpio, always
#   make guest-acpi       vmlinux-acpi: the emulated kernel with ACPI (always built)
#   make test             the test suite
#   make fuzz             the virtqueue engine fuzzer (FUZZ_SECONDS=300)
#   make bench            minivmm next to QEMU (bench/run.py; BENCH_ARGS=--reps N)
#   make bench-smoke      every benchmark once, tiny sizes (CI: checks it still runs)
#   make clean            remove guest/out/ (the cache stays; delete
#                         ~/.cache/minivmm to rebuild from scratch)

OUT := $(abspath guest/out)
PYTHON ?= python3

.PHONY: all guest guest-linux guest-initramfs guest-probe guest-emulated test clean

all: guest

guest: guest-linux guest-initramfs guest-initramfs-check guest-probe
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

guest-acpi:
	guest/build-kernel.sh acpi $(OUT)

.PHONY: guest-initramfs-check guest-acpi

test:
	$(PYTHON) -m pytest

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
