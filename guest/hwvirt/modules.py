#!/usr/bin/env python3
"""Print the load order of kernel modules and everything they depend on.

Usage: modules.py MODULES_DIR NAME[=ARGS]...

MODULES_DIR is an unpacked /lib/modules/<version> with modules.dep (depmod -b).
NAME is a module name (``kvm_amd`` and ``kvm-amd`` are the same module); ARGS, if
given, are its parameters (``kvm_amd=nested=1,npt=1`` -> ``nested=1 npt=1``).
Output: one line per module, dependencies first (depth-first over modules.dep, each
module once: minivmm.kmod.ModuleTree, which `minivmm exec` uses too),
``<path relative to MODULES_DIR> [params...]``. A module built into the kernel
(modules.builtin) prints nothing; an unknown one is an error (exit 1).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from minivmm.kmod import ModuleTree, canon  # this checkout's minivmm


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(f"usage: {argv[0]} MODULES_DIR NAME[=ARGS]...", file=sys.stderr)
        return 2
    tree = ModuleTree.read(Path(argv[1]))
    params: dict[str, str] = {}
    for arg in argv[2:]:
        raw, _, args = arg.partition("=")
        params[canon(raw)] = args.replace(",", " ")
    try:
        order = tree.load_order(params)
    except ValueError as e:
        print(f"modules.py: {e}", file=sys.stderr)
        return 1
    for name in order:
        print(f"{tree.paths[name]} {params.get(name, '')}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
