"""Run a producer iterator on a background thread, a bounded number of items ahead of its consumer.

The Reranker tokenizes and assembles batches here while the device scores earlier ones. The queue is
bounded (memory stays flat however long the input), an exception raised by the producer is re-raised
in the consumer, and `close()` (also on `with` exit) stops and joins the thread even when the consumer
stops early, so no thread outlives the call that started it.
"""
from __future__ import annotations

import queue
import threading
from typing import Any, Generic, Iterable, Iterator, TypeVar

T = TypeVar("T")

_PUT_POLL_S = 0.05  # how often a blocked producer checks whether the consumer has gone


class _Done:
    pass


class _Failed:
    def __init__(self, error: BaseException) -> None:
        self.error = error


EMPTY: Any = object()  # what `get(timeout=...)` returns when nothing arrived in time
_DONE = _Done()


class _Stopped(Exception):
    """The consumer closed the prefetcher: the producer thread unwinds quietly."""


class BackgroundIterator(Generic[T]):
    """Iterate `source` on a daemon thread, at most `size` items ahead of the consumer."""

    def __init__(self, source: Iterable[T], *, size: int = 4, name: str = "twolar-prefetch") -> None:
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"prefetch size must be an integer >= 1, got {size!r}")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._finished = False
        self._thread = threading.Thread(target=self._produce, args=(source,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_PUT_POLL_S)
                return
            except queue.Full:
                continue
        raise _Stopped

    def _produce(self, source: Iterable[T]) -> None:
        try:
            for item in source:
                self._put(item)
            self._put(_DONE)
        except _Stopped:
            return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            try:
                self._put(_Failed(e))
            except _Stopped:
                return

    def get(self, timeout: float | None = None) -> T:
        """The next item; EMPTY if `timeout` passed first; raises StopIteration at the end and the
        producer's own exception if it failed."""
        if self._finished:
            raise StopIteration
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return EMPTY
        if item is _DONE:
            self._finished = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._finished = True
            self.close()
            raise item.error
        return item

    def __iter__(self) -> Iterator[T]:
        return self

    def __next__(self) -> T:
        return self.get()

    def close(self) -> None:
        """Stop the producer and wait for its thread (idempotent); the iterator is then exhausted."""
        self._stop.set()
        self._finished = True
        while self._thread.is_alive():
            try:  # make room, so a producer blocked in put() sees the stop flag
                while True:
                    self._queue.get_nowait()
            except queue.Empty:
                pass
            self._thread.join(timeout=_PUT_POLL_S)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> "BackgroundIterator[T]":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
