#!/bin/sh
# Exit 0 when this host's KVM runs guest kernel (CPL0) code in its instruction
# emulator, i.e. /dev/kvm comes from the kvm_pvm module (REFERENCE.md §1);
# exit 1 otherwise. `-v` also prints one sentence saying which.
verbose=${1:-}
if [ -d /sys/module/kvm_pvm ] ||
    grep -qs '^kvm_pvm ' /proc/modules ||
    dmesg 2>/dev/null | grep -q 'kvm[-_]pvm'; then
    [ "$verbose" = -v ] && echo "host: KVM is kvm_pvm, which emulates guest kernel code; building guest/out/vmlinux-emulated too"
    exit 0
fi
[ "$verbose" = -v ] && echo "host: KVM runs guest kernel code natively (no kvm_pvm)"
exit 1
