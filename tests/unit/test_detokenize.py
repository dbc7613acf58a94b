"""Streaming detokenization (``model_repo/postprocessing/1/detokenize.py``): pieces of a stream
concatenate to the text of all its tokens, with characters split over several tokens (byte-level
BPE, SentencePiece byte fallback) and SentencePiece's leading spaces."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from pipeline.assets import TEMPLATES_DIR

TEXT = "Hello wörld 😀 and 日本語, ok?"


def _module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "detokenize", TEMPLATES_DIR / "postprocessing" / "1" / "detokenize.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def byte_level() -> Any:
    """GPT-2 style: every byte its own token (no merges), so a 4-byte emoji is 4 tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def byte_fallback() -> Any:
    """Llama 2 / Mistral style SentencePiece: words with a leading '▁', anything else as <0xNN> bytes."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{f"<0x{b:02X}>": 1 + b for b in range(256)}}
    for piece in ["▁", "▁Hello", "▁w", "ö", "rld", "▁and", ",", "▁ok", "?"]:
        vocab[piece] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")


@pytest.mark.parametrize("make", [byte_level, byte_fallback])
def test_the_pieces_of_a_stream_are_its_text(make: Any) -> None:
    tokenizer = make()
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    assert tokenizer.decode(ids) == TEXT
    naive = "".join(tokenizer.decode([i]) for i in ids)
    assert naive != TEXT  # decoding token by token breaks it: the case this module is for
    decoder = _module().StreamDecoder(tokenizer)
    pieces = [decoder.push([i]) for i in ids]
    assert "".join(pieces) == TEXT and not any("\ufffd" in p for p in pieces)
    assert "" in pieces  # some tokens held back part of a character
    decoder = _module().StreamDecoder(tokenizer)
    assert "".join(decoder.push(ids[i : i + 3]) for i in range(0, len(ids), 3)) == TEXT  # several at a time


def test_streams_are_kept_apart_and_forgotten_when_idle() -> None:
    tokenizer = byte_level()
    ids = tokenizer.encode("日本", add_special_tokens=False)  # 6 bytes, 6 tokens
    streams = _module().Streams(tokenizer)
    assert streams.push("a", ids[:2]) == "" and streams.push("b", ids[:3]) == "日"
    assert streams.push("a", ids[2:]) == "日本" and set(streams.open) == {"a", "b"}
    forgetful = _module().Streams(tokenizer, idle_s=-1.0)  # every stream is idle at the next push
    assert forgetful.push("a", ids[:2]) == ""
    assert forgetful.push("a", ids[2:3]) == ""  # its first two bytes are gone: one alone is no character


def test_a_stream_cut_inside_a_character_flushes_it_at_the_end_as_the_whole_text_shows_it() -> None:
    tokenizer = byte_level()
    ids = tokenizer.encode("a日本", add_special_tokens=False)[:5]  # "a", all of 日, one byte of 本
    whole = tokenizer.decode(ids)
    assert whole.endswith("\ufffd")
    streams = _module().Streams(tokenizer)
    pieces = [streams.push("s", [token]) for token in ids]
    assert "\ufffd" not in "".join(pieces)  # held back while more bytes may come
    pieces.append(streams.end("s"))
    assert "".join(pieces) == whole and "s" not in streams.open and streams.end("s") == ""
