"""minivmm: a small, fast virtual machine monitor in Python on Linux KVM.

Layers, each depending only on those below it:

    kvm        ctypes bindings to /dev/kvm (System, Vm, Vcpu)
    memory     guest memory: bounds-checked, zero-copy memoryviews
    x86        boot: kernel loaders, boot parameters, vCPU set-up
    bus        port-I/O and MMIO buses, with the legacy devices in devices/legacy
    transport  virtio-mmio
    devices    VirtioDevice implementations
    virtio     the shared virtqueue engine (ring -> queue -> chain, mem, util, testing)
"""

__version__ = "0.1.0"
