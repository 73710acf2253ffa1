"""x86 boot: the guest-physical address map, kernel loaders, boot parameters, vCPU set-up."""
