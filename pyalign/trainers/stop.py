"""A clean stop of a training run on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption).

    with StopSignals() as stop:
        summary = trainer.train(steps, stop=stop)    # summary["interrupted"]: "SIGINT"

The first signal is only noted (``stop.requested``): the trainer finishes the step it is in,
writes a checkpoint and returns; the command line then says where the checkpoint is and how to
resume, and exits with 128 + the signal's number (130, 143), as a shell reports a process the
signal killed. A second SIGINT or SIGTERM stops at once (``KeyboardInterrupt``): nothing past
the last checkpoint is kept. The previous handlers come back when the block ends. Signals can
only be handled in the main thread: elsewhere the block changes nothing.
"""
from __future__ import annotations

import signal
import threading
from typing import Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Turns the first SIGINT/SIGTERM into a stop request (see the module docstring)."""

    def __init__(self):
        self.requested: Optional[str] = None  # the name of the signal that asked for a stop
        self.exit_code: Optional[int] = None
        self._previous: dict = {}

    def _handle(self, number: int, frame) -> None:
        if self.requested is not None:  # the second one: stop at once
            raise KeyboardInterrupt(f"a second {signal.Signals(number).name}")
        self.requested = signal.Signals(number).name
        self.exit_code = 128 + number

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


__all__ = ["StopSignals"]
