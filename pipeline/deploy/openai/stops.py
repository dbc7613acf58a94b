"""OpenAI's ``stop`` strings, matched on the text as it streams: a stop string split over several
tokens still stops, and text that might be the start of one is held back until it is known not
to be, so a client never sees any part of a stop string."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""  # text held back: it may begin a stop string
        self.stopped = False

    def push(self, text: str) -> str:
        """The part of ``text`` (with what was held back) that can go out now."""
        if self.stopped:
            return ""
        self.pending += text
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped = True
            out, self.pending = self.pending[: min(found)], ""
            return out
        hold = max((self._overlap(s) for s in self.stops), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        """What was held back, once the text has ended without completing a stop string."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out

    def _overlap(self, stop: str) -> int:
        """Length of the longest end of the pending text that begins ``stop``."""
        for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if stop.startswith(self.pending[-size:]):
                return size
        return 0
