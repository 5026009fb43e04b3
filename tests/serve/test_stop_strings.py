"""StopMatcher: stop strings found in text that arrives in pieces, nothing emitted taken back."""

import random

import pytest

from cluster.serve.completion import StopMatcher


def run(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    """What the matcher emits for each piece (the held text flushed at the end), and whether a stop was hit."""
    matcher, emitted = StopMatcher(stops), []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        emitted.append(text)
        if stopped:
            return emitted, True
    return [*emitted, matcher.flush()], False


def test_a_stop_split_over_pieces_is_found_and_never_emitted():
    emitted, stopped = run(["END"], ["abc E", "N", "D tail"])
    assert stopped and emitted == ["abc ", "", ""]


def test_held_text_that_is_no_stop_is_emitted_with_the_next_piece():
    emitted, stopped = run(["END"], ["abc E", "Nx", "yz"])
    assert not stopped and emitted == ["abc ", "ENx", "yz", ""]


def test_the_earliest_of_several_stops_wins():
    emitted, stopped = run(["world", "lo w"], ["hello world"])
    assert stopped and emitted == ["hel"]


def test_text_held_at_the_end_is_flushed():
    emitted, stopped = run(["\nUser:"], ["reply\nUs"])
    assert not stopped and "".join(emitted) == "reply\nUs"


@pytest.mark.parametrize("seed", range(20))
def test_any_split_emits_exactly_the_text_before_the_first_stop(seed):
    rng = random.Random(seed)
    text = "".join(rng.choice("ab\n") for _ in range(40))
    stops = ["".join(rng.choice("ab\n") for _ in range(rng.randint(1, 4))) for _ in range(2)]
    cuts = sorted(rng.sample(range(1, len(text)), 6))
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    emitted, stopped = run(stops, pieces)
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
    assert stopped == (first is not None)
    assert "".join(emitted) == (text if first is None else text[:first])
