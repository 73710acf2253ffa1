"""Tests of the shared virtqueue engine (minivmm.virtio), all through the fake driver."""
