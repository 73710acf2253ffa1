"""Long, time-boxed fuzzing of the virtqueue engine (not collected by pytest).

    python -m tests.virtio.fuzz_queue --seconds 600 [--steps 100]

Runs the hostile-driver state machine of queue_machine.py in batches of fresh random
examples until the time is up, then prints how often each outcome of ``pop`` was seen.
A failure prints Hypothesis's minimal falsifying example and exits with status 1.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time

from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

from . import queue_machine
from .queue_machine import QueueMachine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Fuzz the virtqueue engine with a hostile driver.")
    p.add_argument("--seconds", type=float, default=60.0, help="time budget (default 60)")
    p.add_argument("--steps", type=int, default=100, help="max steps per example")
    p.add_argument("--batch", type=int, default=200, help="examples per batch")
    a = p.parse_args(argv)

    outcomes: collections.Counter[str] = collections.Counter()
    queue_machine.outcome_observers.append(lambda name: outcomes.update([name]))
    deadline = time.monotonic() + a.seconds
    batches = 0
    while time.monotonic() < deadline:
        try:
            # hypothesis leaves run_state_machine_as_test unannotated
            run_state_machine_as_test(  # type: ignore[no-untyped-call]
                QueueMachine,
                settings=settings(
                    max_examples=a.batch,
                    stateful_step_count=a.steps,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                ),
            )
        except Exception as e:  # a falsifying example (Hypothesis printed it)
            print(f"FAILED after {batches} batches: {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        batches += 1
    print(f"{batches} batches of {a.batch} examples (up to {a.steps} steps), no failure")
    for name, n in outcomes.most_common():
        print(f"{n:>10}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
