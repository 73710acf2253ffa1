"""devices: VirtioDevice implementations (later) and the legacy devices in devices.legacy"""
