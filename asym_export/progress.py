"""Progress reporting for long steps. The library calls a :class:`Progress`; the CLI decides
how it looks (the default does nothing, so library users see only ``logging``)."""

from __future__ import annotations

import contextlib
import sys
import threading
import time


class Progress:
    """No-op progress sink; subclasses print."""

    @contextlib.contextmanager
    def step(self, label: str):
        yield self

    def note(self, text: str) -> None:  # a detail line under the current step
        pass


class ConsoleProgress(Progress):
    """Prints ``[i] label ... done (12.3 s)``; on a terminal an elapsed-time ticker runs while
    the step is busy, so a minute-long export never looks hung."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.count = 0
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())

    @contextlib.contextmanager
    def step(self, label: str):
        self.count += 1
        head = f"[{self.count}] {label} ..."
        t0 = time.perf_counter()
        stop = threading.Event()
        ticker = None
        if self.tty:
            def tick():
                while not stop.wait(0.5):
                    self.stream.write(f"\r{head} {time.perf_counter() - t0:5.0f} s")
                    self.stream.flush()
            ticker = threading.Thread(target=tick, daemon=True)
            ticker.start()
        else:
            self.stream.write(head + "\n")
            self.stream.flush()
        ok = False
        try:
            yield self
            ok = True
        finally:
            stop.set()
            if ticker:
                ticker.join()
            tail = f"{'done' if ok else 'FAILED'} ({time.perf_counter() - t0:.1f} s)"
            self.stream.write(f"\r{head} {tail}\n" if self.tty else f"    {tail}\n")
            self.stream.flush()

    def note(self, text: str) -> None:
        self.stream.write(f"      {text}\n")
        self.stream.flush()
