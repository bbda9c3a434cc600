"""Progress bars for long work: tqdm, cleared when the work fails.

Why: a bar left at "37%" above the one-line error reads as a second message; a finished bar stays, as a
record of what ran.
"""
from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


class ProgressBar(tqdm):
    """tqdm whose line is erased instead of kept when an exception leaves its `with` block or `fail()` is called."""

    def __exit__(self, exc_type: Any, exc_value: Any, traceback: Any) -> Any:
        if exc_type is not None:
            self.leave = False
        return super().__exit__(exc_type, exc_value, traceback)

    def fail(self) -> None:
        """Close, erasing the bar (for bars closed in a `finally` rather than a `with`)."""
        self.leave = False
        self.close()


def progress_bar(*args: Any, **kwargs: Any) -> ProgressBar:
    """A ProgressBar with the project's defaults (columns follow the terminal's width)."""
    kwargs.setdefault("dynamic_ncols", True)
    return ProgressBar(*args, **kwargs)
