"""Work that must not run on Slicer's GUI thread (hashing, downloads, imports, HTTP checks, device probes).

``BackgroundTask(fn)`` runs ``fn(progress, cancelled)`` on a daemon thread: ``progress(fraction_or_None, text)``
reports, ``cancelled()`` says whether the user asked to stop (``fn`` checks it between blocks). The widget starts
the task and polls it from a ``QTimer``: ``poll()`` returns immediately with the state (``running``, ``done``,
``error``, ``cancelled``); ``result`` holds ``fn``'s return value, ``message`` a one-line error. No Qt here, so the
same tasks run in tests and scripts (``wait()`` blocks, for them only).
"""
from __future__ import annotations

import threading
import time
from typing import Any, Callable, Optional

RUNNING, DONE, FAILED, CANCELLED = "running", "done", "error", "cancelled"


def oneLine(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class BackgroundTask:
    def __init__(self, fn: Callable[[Callable, Callable[[], bool]], Any], description: str = ""):
        self.fn = fn
        self.description = description
        self.state = RUNNING
        self.result: Any = None
        self.message = ""
        self.fraction: Optional[float] = None
        self.text = description
        self._cancel = threading.Event()
        self._lock = threading.Lock()
        self._outcome: Optional[tuple] = None
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"SpineInpaint-{description[:20]}")

    def start(self) -> "BackgroundTask":
        self._thread.start()
        return self

    def _progress(self, fraction: Optional[float] = None, text: Optional[str] = None) -> None:
        with self._lock:
            self.fraction = None if fraction is None else max(0.0, min(1.0, float(fraction)))
            if text is not None:
                self.text = text

    def _run(self) -> None:
        try:
            outcome = (DONE, self.fn(self._progress, self._cancel.is_set), "")
        except BaseException as e:  # noqa: BLE001 - reported to the GUI as one line, never raised there
            cancelled = self._cancel.is_set() or type(e).__name__ == "CancelledError"
            outcome = (CANCELLED if cancelled else FAILED, None, "cancelled" if cancelled else oneLine(e))
        with self._lock:
            self._outcome = outcome

    def poll(self) -> str:
        """The state now (never blocks)."""
        with self._lock:
            if self.state == RUNNING and self._outcome is not None:
                self.state, self.result, self.message = self._outcome
        return self.state

    def cancel(self) -> None:
        """Ask ``fn`` to stop at its next check; ``poll()`` says when it did."""
        self._cancel.set()

    def wait(self, timeout: Optional[float] = None) -> str:
        """Block until the task ends (scripts and tests; never from the GUI)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() == RUNNING and (deadline is None or time.monotonic() < deadline):
            time.sleep(0.01)
        return self.state
