"""Errors the model package raises for problems with a user's checkpoint (as opposed to bugs in n4)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint cannot be loaded: files missing or unreadable, or tensors missing, unexpected or mis-shaped.

    The message names the file or tensor at fault, so a user can tell which checkpoint is broken and how.
    """
