#!/usr/bin/env python3
"""Print the load order of kernel modules and everything they depend on.

Usage: modules.py MODULES_DIR NAME[=ARGS]...

MODULES_DIR is an unpacked /lib/modules/<version> with modules.dep (depmod -b).
NAME is a module name (``kvm_amd`` and ``kvm-amd`` are the same module); ARGS, if
given, are its parameters (``kvm_amd=nested=1,npt=1`` -> ``nested=1 npt=1``).
Output: one line per module, dependencies first (depth-first over modules.dep, each
module once), ``<path relative to MODULES_DIR> [params...]``. A module built into the
kernel (modules.builtin) prints nothing; an unknown one is an error (exit 1).
"""

from __future__ import annotations

import sys
from pathlib import Path


def canon(name: str) -> str:
    return name.replace("-", "_")


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(f"usage: {argv[0]} MODULES_DIR NAME[=ARGS]...", file=sys.stderr)
        return 2
    root = Path(argv[1])
    deps: dict[str, list[str]] = {}
    path_of: dict[str, str] = {}
    for line in (root / "modules.dep").read_text().splitlines():
        target, _, rest = line.partition(":")
        name = canon(Path(target).name.split(".ko")[0])
        path_of[name] = target
        deps[name] = [canon(Path(d).name.split(".ko")[0]) for d in rest.split()]
    builtin = {canon(Path(line).name.split(".ko")[0])
               for line in (root / "modules.builtin").read_text().split()}

    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        for dep in deps[name]:
            visit(dep)
        order.append(name)

    params: dict[str, str] = {}
    for arg in argv[2:]:
        raw, _, args = arg.partition("=")
        name = canon(raw)
        if name in builtin:
            continue
        if name not in deps:
            print(f"modules.py: no module {raw!r} in {root}", file=sys.stderr)
            return 1
        params[name] = args.replace(",", " ")
        visit(name)
    for name in order:
        print(f"{path_of[name]} {params.get(name, '')}".rstrip())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
