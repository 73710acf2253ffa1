"""minivmm's version, written once (pyproject.toml carries the same string): the package
re-exports it as ``minivmm.__version__``, and snapshots record it."""

__version__ = "0.1.0"
