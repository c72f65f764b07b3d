"""Progress for long work: a tqdm bar in a terminal, a plain log line every few seconds otherwise
(CI, nohup, `docker run` without -t, DVC's captured output), so nobody waits in silence."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        enabled: bool = True,
        every_s: float = 10.0,
        stream=None,
        initial: int = 0,
    ):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.stream = stream or sys.stderr
        self.n = self.start = initial
        self.t0 = self.last = time.perf_counter()
        self.postfix = ""
        tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.bar = (
            tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                mininterval=1.0,
                file=self.stream,
                dynamic_ncols=True,
            )
            if tty
            else None
        )
        self.lines = enabled and not tty

    def set_postfix(self, **values: str) -> None:
        """Figures shown beside the count (e.g. loss=..., img_s=...)."""
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)
        self.postfix = ", ".join(f"{k} {v}" for k, v in values.items())

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.lines:
            now = time.perf_counter()
            if now - self.last >= self.every_s or self.n == self.total:
                self.last = now
                rate = (self.n - self.start) / max(now - self.t0, 1e-9)
                left = (self.total - self.n) / rate if rate > 0 else float("nan")
                extra = f", {self.postfix}" if self.postfix else ""
                print(
                    f"{self.desc}: {self.n}/{self.total} {self.unit}s, {now - self.t0:.0f} s, "
                    f"~{left:.0f} s left{extra}",
                    file=self.stream,
                    flush=True,
                )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
