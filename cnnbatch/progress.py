"""Progress for long jobs: a tqdm bar on a terminal, periodic plain log lines everywhere else (Ray job logs, CI)."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger(__name__)
LOG_EVERY_SECONDS = 15.0


class Progress:
    """Counts shards, images and errors; shows images/s since the first shard finished."""

    def __init__(self, what: str = "images", total_shards: int | None = None, stream=None):
        self.stream = stream or sys.stderr
        self.what = what
        self.shards = self.images = self.errors = 0
        self.started = time.perf_counter()
        self._last_log = self.started
        self._bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self._bar = tqdm(total=total_shards, unit="shard", file=self.stream, dynamic_ncols=True)

    @property
    def rate(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.images / elapsed if elapsed > 0 else 0.0

    def update(self, shards: int = 0, images: int = 0, errors: int = 0) -> None:
        self.shards += shards
        self.images += images
        self.errors += errors
        if self._bar is not None:
            self._bar.update(shards)
            self._bar.set_postfix_str(f"{self.images} {self.what}, {self.errors} errors, {self.rate:.1f} {self.what}/s")
            return
        now = time.perf_counter()
        if now - self._last_log >= LOG_EVERY_SECONDS:
            self._last_log = now
            log.info("progress: %d shards, %d %s, %d errors, %.1f %s/s",
                     self.shards, self.images, self.what, self.errors, self.rate, self.what)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
