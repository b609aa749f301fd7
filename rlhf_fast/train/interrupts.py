"""``held_interrupts``: a Ctrl-C that arrives while a checkpoint is being written takes effect when the
write ends, so that the run it interrupts has a whole newest checkpoint to resume from.

Without it the KeyboardInterrupt lands inside ``torch.save``, whose archive writer then fails on
closing and replaces the interrupt with a RuntimeError: the user gets a traceback instead of the
line saying where to resume. A second Ctrl-C during the same write is obeyed at once (the user
insists; the write's temporary file is removed and the previous checkpoint stays the newest).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator


HELD_NOTICE = "rlhf-fast: interrupt received; stopping once the checkpoint being written is complete (Ctrl-C again to stop now)"


@contextlib.contextmanager
def held_interrupts() -> Iterator[None]:
    """Hold SIGINT for the body, then deliver it to the handler that was there before. Only the main
    thread can install handlers; elsewhere, and where SIGINT is ignored or left to the OS, the body
    runs unchanged."""
    previous = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    if not callable(previous):
        yield
        return
    held = []

    def hold(signum, frame):
        if held:
            signal.signal(signal.SIGINT, previous)
            previous(signum, frame)
        held.append((signum, frame))
        print(HELD_NOTICE, file=sys.stderr)

    signal.signal(signal.SIGINT, hold)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is hold:
            signal.signal(signal.SIGINT, previous)
    if held:
        previous(*held[0])
