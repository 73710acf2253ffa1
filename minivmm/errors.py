"""The errors minivmm reports to its user.

``UsageError`` is bad user input: the CLI prints its one-line message and exits 2.
``VmmError`` is a failure of the VMM or the guest: one line, exit status 1.
Both carry a message meant for a person, naming the problem and how to fix it.
"""


class VmmError(Exception):
    """A failure of the VMM or of the guest (exit status 1)."""

    exit_status = 1


class UsageError(VmmError):
    """Bad user input: a missing file, a malformed option (exit status 2)."""

    exit_status = 2
