"""The stop-string rule every token-by-token backend shares (runtime/stops.py): the stop string that completes
first ends the pass, cut right after it; a tail that could still become a stop string is held back from streaming."""

from __future__ import annotations

import pytest

from medrwr_edge.runtime.stops import StopCut, first_stop, partial_stop_len


@pytest.mark.parametrize(
    "text, stops, expected",
    [("abc </que", ["</query>"], 5), ("abc <", ["</query>", "<answer>"], 1), ("abc", ["</query>"], 0)],
)
def test_partial_stop_is_held_back(text, stops, expected):
    assert partial_stop_len(text, stops) == expected


def test_first_completed_stop_wins():
    assert first_stop("x </answer> </query>", ["</query>", "</answer>"], 0) == ("</answer>", 11)
    assert first_stop("no stop here", ["</query>"], 0) is None


def test_a_token_running_past_the_stop_string_is_cut_and_nothing_past_it_streams():
    streamed = []
    cut = StopCut(["</query>", ""], streamed.append)  # an empty stop string stops nothing
    assert [cut.offer(p) for p in ("I see <q", "uery> air </", "que")] == [False, False, False]
    assert "".join(streamed) == "I see <query> air "  # "</que" could still become "</query>": held back
    assert cut.offer("ry>\nmore") is True
    assert (cut.text, cut.stop_hit, cut.tail, cut.overshoot) == ("I see <query> air </query>", "</query>",
                                                                  "ry>", len("\nmore"))
    cut.flush()
    assert "".join(streamed) == cut.text


def test_a_stop_string_ending_with_its_token_has_no_overshoot_and_without_one_all_streams():
    cut = StopCut(["</answer>"])
    assert cut.offer("B </answer>") and (cut.tail, cut.overshoot) == ("B </answer>", 0)
    streamed = []
    plain = StopCut(["</answer>"], streamed.append)
    for piece in ("no", " tags", " <"):
        assert plain.offer(piece) is False
    assert "".join(streamed) == "no tags "
    plain.flush()  # the pass ended (end of turn, length): the held-back "<" is text after all
    assert "".join(streamed) == "no tags <" == plain.text and plain.stop_hit is None
