"""The hardware-virtualization tier: tests that need a KVM with VT-x/AMD-V behind it.

`make test-hwvirt` runs them: directly on such a host, and on hosts whose KVM emulates
guest kernel code (kvm_pvm) inside L1, a Debian Linux with nested SVM under QEMU's
software emulator (guest/hwvirt/run.py; README "The hardware-virtualization test tier").
Every test asserts on what a guest reports from inside.
"""
