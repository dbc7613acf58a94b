"""Stop strings on streamed text: split over pieces, held back while undecided, never shown."""

from __future__ import annotations

import pytest

from pipeline.deploy.openai.stops import StopMatcher


def _run(stops: list[str], pieces: list[str]) -> tuple[str, bool, list[str]]:
    matcher = StopMatcher(stops)
    out = [matcher.push(p) for p in pieces]
    out.append(matcher.flush())
    return "".join(out), matcher.stopped, out


@pytest.mark.parametrize(
    ("stops", "pieces", "text", "stopped"),
    [
        (["END"], ["Hello ", "E", "N", "D", " more"], "Hello ", True),  # split over three pieces
        (["END"], ["Hello E", "NVY"], "Hello ENVY", False),  # a false start is released
        (["\n\n", "Q:"], ["a\n", "\nb"], "a", True),
        (["stop"], ["no match at all"], "no match at all", False),
        ([], ["anything"], "anything", False),
        (["ab", "b"], ["xab"], "x", True),  # the stop that starts first wins
    ],
)
def test_stop_strings_cut_the_text_across_pieces(stops: list[str], pieces: list[str], text: str, stopped: bool) -> None:
    assert _run(stops, pieces)[:2] == (text, stopped)


def test_a_possible_start_is_held_back_until_decided() -> None:
    _, _, out = _run(["END"], ["Hello E", "N", "VY"])
    assert out[0] == "Hello " and out[1] == "" and out[2] == "ENVY"
