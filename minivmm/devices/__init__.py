"""devices: the VirtioDevice base class (base) and its implementations (blk, rng, console,
net, with the TAP helpers in tap), and the legacy port-I/O devices in devices.legacy."""
