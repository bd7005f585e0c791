"""A graceful stop on SIGTERM / SIGINT for the training loop.

The handler only records which signal arrived (no I/O, no locks: it may run between any two
bytecodes of the loop, in the middle of a checkpoint write). The loop checks ``requested`` after
each step, writes a checkpoint and returns. Repeated signals are ignored, because launchers and
terminals often deliver the same Ctrl-C twice (to the process group and forwarded); to stop at
once, send SIGKILL (``kill -9``) or SIGQUIT (Ctrl-\\): checkpoint writes are atomic, so the last
complete checkpoint survives either.
"""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Set by the first stop signal; read by the loop."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum is not None else None

    def handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum


@contextmanager
def stop_on_signals(signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[StopRequest]:
    """Within the block, ``signals`` set the returned request instead of stopping the process;
    the previous handlers are restored on leaving it, whatever happened inside."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request  # Python delivers signals to the main thread only; nothing to install here
        return
    previous = {s: signal.signal(s, request.handle) for s in signals}
    try:
        yield request
    finally:
        for s, handler in previous.items():
            # None: a handler installed outside Python, which cannot be reinstalled from here
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
