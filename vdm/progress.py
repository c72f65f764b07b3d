"""Progress for long work: a tqdm bar in a terminal, a plain log line every few seconds otherwise
(CI, nohup, `docker run` without -t, DVC's captured output), so nobody waits in silence."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, desc: str, unit: str, enabled: bool = True, every_s: float = 10.0, stream=None):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.n, self.t0 = 0, time.perf_counter()
        self.last = self.t0
        tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = tqdm(total=total, desc=desc, unit=unit, mininterval=1.0, file=self.stream) if tty else None
        self.lines = enabled and not tty

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.lines:
            now = time.perf_counter()
            if now - self.last >= self.every_s:
                self.last = now
                rate = self.n / max(now - self.t0, 1e-9)
                left = (self.total - self.n) / rate if rate > 0 else float("nan")
                print(
                    f"{self.desc}: {self.n}/{self.total} {self.unit}s, {now - self.t0:.0f} s, ~{left:.0f} s left",
                    file=self.stream,
                    flush=True,
                )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
