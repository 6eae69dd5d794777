"""Ctrl-C and SIGTERM as KeyboardInterrupt, except inside safetensors calls, where they wait until the call returns.

A KeyboardInterrupt raised by a signal handler while safetensors' Rust code is calling back into Python comes out
of the call as an unrelated ValueError ("could not determine the shape of object type
'torch.storage.UntypedStorage'"): 16 of 40 SIGTERMs sent to a loop of `get_slice` reads did so (safetensors 0.8).
That would read as a user error (exit 2) instead of an interrupt (exit 130). So while a `shielded()` block runs,
the handler only records the signal, and the block raises KeyboardInterrupt when it ends.
"""
from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable, Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"depth": 0, "pending": False}


def _handler(signum, frame) -> None:
    if _state["depth"]:
        _state["pending"] = True
    else:
        raise KeyboardInterrupt


def install() -> Callable[[], None]:
    """Route SIGINT and SIGTERM through the shield (main thread only); returns a function restoring the previous
    handlers."""
    previous = {sig: signal.signal(sig, _handler) for sig in _SIGNALS}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _state["pending"] = False

    return restore


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    _state["depth"] += 1
    try:
        yield
    finally:
        _state["depth"] -= 1
    if _state["pending"] and not _state["depth"]:
        _state["pending"] = False
        raise KeyboardInterrupt
