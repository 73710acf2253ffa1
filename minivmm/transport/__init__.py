"""Virtio transports: how a driver finds and talks to a VirtioDevice (virtio-mmio)."""
