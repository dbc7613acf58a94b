"""Guided decoding on the CPU target through xgrammar, the library TensorRT-LLM's own guided
decoding uses, with the backend's request inputs: ``guided_decoding_guide_type`` one of json
(any JSON value), json_schema, regex or ebnf_grammar, and ``guided_decoding_guide`` the schema,
pattern or grammar. xgrammar and the tokenizer load on the first guided request, so a server that
never sees one pays nothing.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import torch

GUIDE_TYPES = ("json", "json_schema", "regex", "ebnf_grammar")


class Matcher:
    """One sequence's grammar state (``reference_runtime.generate.Guide``)."""

    def __init__(self, xgr: Any, compiled: Any, vocab_size: int):
        self.xgr = xgr
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def mask(self, scores: torch.Tensor) -> None:
        if self.matcher.is_terminated():
            return
        self.matcher.fill_next_token_bitmask(self.bitmask)
        self.xgr.apply_token_bitmask_inplace(scores.view(1, -1), self.bitmask)

    def accept(self, token: int) -> None:
        if not self.matcher.is_terminated():
            self.matcher.accept_token(token)


MAX_GUIDE_BYTES = 64 * 1024  # a schema or grammar larger than this is refused: compiling it would take seconds
CACHE_BYTES = 64 * 2**20  # xgrammar's cache of compiled grammars (unbounded by default: every distinct schema stays)
COMPILE_THREADS = 2  # xgrammar's default is 8, on a host that has fewer cores than that for everything


class Grammars:
    """Compiles guides (xgrammar caches what it compiled, within CACHE_BYTES) and hands out one
    matcher per sequence."""

    def __init__(self, tokenizer_dir: Path, vocab_size: int):
        self.tokenizer_dir, self.vocab_size = tokenizer_dir, vocab_size
        self._compiler: Any = None
        self._xgr: Any = None
        self._lock = threading.Lock()

    def _load(self) -> tuple[Any, Any]:
        with self._lock:
            if self._compiler is None:
                import xgrammar
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
                info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size)
                self._xgr, self._compiler = (
                    xgrammar,
                    xgrammar.GrammarCompiler(info, max_threads=COMPILE_THREADS, cache_limit_bytes=CACHE_BYTES),
                )
        return self._xgr, self._compiler

    def compile(self, guide_type: str, guide: str) -> Any:
        """The compiled grammar; ValueError naming the input when it is unknown or does not compile."""
        if guide_type not in GUIDE_TYPES:
            raise ValueError(f"guided_decoding_guide_type={guide_type!r}: use one of {', '.join(GUIDE_TYPES)}")
        if guide_type != "json" and not guide:
            raise ValueError(f"guided_decoding_guide is empty: a {guide_type} guide needs one")
        if len(guide.encode()) > MAX_GUIDE_BYTES:
            raise ValueError(f"guided_decoding_guide is {len(guide.encode())} bytes; at most {MAX_GUIDE_BYTES}")
        _, compiler = self._load()
        try:
            if guide_type == "json":
                return compiler.compile_builtin_json_grammar()
            if guide_type == "json_schema":
                return compiler.compile_json_schema(guide)
            if guide_type == "regex":
                return compiler.compile_regex(guide)
            return compiler.compile_grammar(guide)
        except Exception as error:  # xgrammar raises RuntimeError or ValueError with its parser's message
            raise ValueError(f"guided_decoding_guide is not a valid {guide_type}: {error}") from error

    def matcher(self, compiled: Any) -> Matcher:
        xgr, _ = self._load()
        return Matcher(xgr, compiled, self.vocab_size)
