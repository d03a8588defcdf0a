"""Corpus -> token ids. Stands alone: joined to training only by the meta.json contract."""

__version__ = "0.1.0"


class PrepareError(Exception):
    """A mistake in the user's input: reported as one line and exit code 2, never a traceback."""
