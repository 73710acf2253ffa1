"""Benchmarks of minivmm next to QEMU (run.py: ``python -m bench``), the C exit
round-trip floor (floor.c) and the virtqueue engine micro-benchmark (queue_engine.py).
Nothing here is a test: CI runs only ``python -m bench --smoke``."""
