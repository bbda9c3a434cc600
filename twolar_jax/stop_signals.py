"""Stop a training run at a step boundary when asked to, so that it saves the step it reached and can resume.

Why: a preemptible TPU gets SIGTERM some 30 s before it is taken away, a batch scheduler sends SIGTERM
before its deadline, and a person presses Ctrl-C; without this, every step since the last periodic
checkpoint (up to `CheckpointConfig.period` of them) is lost. The loop asks `due(step)` after each step
and, when it says yes, saves that step and stops.

- One process: SIGTERM and the first SIGINT set a flag; a second Ctrl-C interrupts at once, as usual.
- Several processes (a pod): JAX's preemption service (on with `jax.distributed`) catches SIGTERM on any
  host and agrees with the others on one step (`multihost_utils.reached_preemption_sync_point`), so every
  host saves the same checkpoint. Our handlers stay out of its way; a Ctrl-C on one host interrupts it.
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Optional

log = logging.getLogger("twolar_jax.train")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequest:
    """Signal handlers for a run (a context manager) and the question the loop asks after each step."""

    def __init__(self, process_count: int = 1) -> None:
        self.process_count = process_count
        self.signal: Optional[int] = None  # the signal that asked for the stop
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        # Only the main thread may install handlers; elsewhere (a library caller's worker) none are installed.
        if self.process_count == 1 and threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> bool:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        return False

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        if self.signal is None:
            log.warning("%s received: stopping after this step, saving its checkpoint (Ctrl-C again to stop at "
                        "once)", signal.Signals(signum).name)
        self.signal = self.signal or signum

    def due(self, step: int) -> bool:
        """Whether to save `step` and stop. On several processes every host must ask at every step."""
        if self.process_count > 1:
            from jax.experimental import multihost_utils

            try:
                reached = multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # the preemption service is off (jax_enable_preemption_service)
                return False
            if reached:
                self.signal = signal.SIGTERM
            return reached
        return self.signal is not None

    @property
    def name(self) -> Optional[str]:
        return None if self.signal is None else signal.Signals(self.signal).name


def exit_code(name: str) -> int:
    """128 + the signal's number ("SIGTERM" -> 143), as a shell reports a process the signal ended."""
    return 128 + signal.Signals[name].value
