"""The hostile-driver state machine, sized for CI (see queue_machine.py)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings

from .queue_machine import QueueMachine

QueueMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestQueueMachine = QueueMachine.TestCase
