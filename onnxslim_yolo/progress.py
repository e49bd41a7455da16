"""Progress of long work (calibration, sensitivity sweeps, refits, evaluation), in one place.

On a terminal a tqdm bar redraws in place. Anywhere else (a CI log, a file, a notebook) a redrawn
bar is unreadable and was switched off, so a 30-minute evaluation printed nothing until it ended:
there the same bar prints one plain line every :data:`LINE_EVERY` seconds instead, the first only
after that long, so work that ends sooner prints nothing.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Iterable, Optional

#: seconds between progress lines when stderr is not a terminal (and before the first)
LINE_EVERY = 30.0


class _Lines:
    """A file for tqdm that turns its in-place redraws (``\\r`` + status) into whole lines on the
    stderr of the moment (test runners swap it), dropping the blank redraw that clears a bar, and
    a line within ``gap`` seconds of the one before: when an update is slower than
    ``maxinterval``, tqdm's monitor thread redraws the bar without marking it drawn, so the next
    update drew it again a second later (two lines of nearly one status in a log)."""

    encoding = "utf-8"

    def __init__(self, gap: float = 0.0) -> None:
        self.gap = gap
        self.last: Optional[float] = None

    def write(self, text: str) -> int:
        for part in str(text).split("\r"):
            if not part.strip():
                continue
            now = time.monotonic()
            if self.last is not None and now - self.last < self.gap:
                continue
            self.last = now
            sys.stderr.write(part.rstrip() + "\n")
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()


def bar(iterable: Optional[Iterable[Any]] = None, *, total: Optional[float] = None, desc: str = "",
        enabled: bool = True, **kw: Any):
    """A tqdm over ``iterable`` (or one to ``update`` by hand); ``enabled`` False shows nothing
    (``--quiet``). On a terminal, a bar; elsewhere, a line every :data:`LINE_EVERY` seconds."""
    from tqdm import tqdm

    kw.setdefault("leave", False)
    if not enabled:
        return tqdm(iterable, total=total, desc=desc, disable=True, **kw)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, file=sys.stderr, **kw)
    kw.setdefault("ascii", True)   # a log may not be read as UTF-8
    # maxinterval too: tqdm's monitor thread redraws a bar not drawn for that long (10 s by default)
    return tqdm(iterable, total=total, desc=desc, file=_Lines(LINE_EVERY / 2), delay=LINE_EVERY,
                mininterval=LINE_EVERY, maxinterval=max(LINE_EVERY, 10.0), ncols=80, **kw)
