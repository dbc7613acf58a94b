"""Streaming detokenization that never splits a character (no pipeline imports: it travels into
the Triton model repository beside the postprocessing model).

A stream's tokens arrive a few at a time. Decoding each piece on its own breaks two ways: a
character whose UTF-8 bytes span two tokens (emoji, CJK, byte-fallback tokens) comes out as
U+FFFD, and SentencePiece tokenizers drop a word's leading space at the start of a decode. So each
stream keeps its tokens: a piece is decoded together with the tokens before it, only the new text
is emitted, and text that ends in an incomplete character is held back until its bytes are all
out. The pieces of a stream concatenate to the text of all its tokens decoded at once.
"""

from __future__ import annotations

import time
from typing import Any

INCOMPLETE = "\ufffd"  # what a decoder makes of a character whose bytes are not all there


class StreamDecoder:
    """One stream. ``push`` takes its next token ids and returns the text they complete."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.tokens: list[int] = []
        self.prefix = 0  # tokens[prefix:read] were emitted last: the context of the next decode
        self.read = 0  # tokens before this are emitted

    def _decode(self, tokens: list[int]) -> str:
        return str(self.tokenizer.decode(tokens, skip_special_tokens=self.skip))

    def push(self, new: list[int]) -> str:
        self.tokens += new
        before = self._decode(self.tokens[self.prefix : self.read])
        after = self._decode(self.tokens[self.prefix :])
        if len(after) <= len(before) or after.endswith(INCOMPLETE):
            return ""  # nothing new, or a character still missing bytes: hold it back
        self.prefix, self.read = self.read, len(self.tokens)
        self.tokens, self.read, self.prefix = self.tokens[self.prefix :], self.read - self.prefix, 0
        return after[len(before) :]

    def flush(self) -> str:
        """The text still held back at the end of the stream (a character cut short by the length
        limit comes out as U+FFFD, as in the whole text decoded at once)."""
        before = self._decode(self.tokens[self.prefix : self.read])
        after = self._decode(self.tokens[self.prefix :])
        self.tokens, self.prefix, self.read = [], 0, 0
        return after[len(before) :]


class Streams:
    """The open streams of a model instance, by key. A stream's last piece is not marked, so a
    stream is forgotten once idle for ``idle_s``."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True, idle_s: float = 300.0):
        self.tokenizer, self.skip, self.idle_s = tokenizer, skip_special_tokens, idle_s
        self.open: dict[str, tuple[StreamDecoder, float]] = {}

    def push(self, key: str, new: list[int]) -> str:
        now = time.monotonic()
        for stale in [k for k, (_, seen) in self.open.items() if now - seen > self.idle_s]:
            del self.open[stale]
        decoder = self.open.get(key, (StreamDecoder(self.tokenizer, self.skip), now))[0]
        self.open[key] = (decoder, now)
        return decoder.push(new)

    def end(self, key: str) -> str:
        """The stream is over: what it still held back, and it is forgotten."""
        decoder, _ = self.open.pop(key, (None, 0.0))
        return "" if decoder is None else decoder.flush()
