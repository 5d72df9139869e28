"""The sequencer: duplicates, gaps, late fills and checkpoints."""

from k2stream.feed.sequencer import Sequencer
from k2stream.records import StreamKey


KEY = StreamKey("BINANCE", "BTCUSDT", "trade")


def make() -> tuple[Sequencer, list[tuple[int, int]], list[StreamKey]]:
    gaps: list[tuple[int, int]] = []
    healed: list[StreamKey] = []
    sequencer = Sequencer(
        lambda key, first, last: gaps.append((first, last)), healed.append
    )
    return sequencer, gaps, healed


def test_consecutive_ids_are_accepted_and_advance_the_checkpoint():
    """Consecutive ids are new and the checkpoint follows the last one."""
    sequencer, gaps, _ = make()

    assert [True, True, True] == [sequencer.accept(KEY, i) for i in (10, 11, 12)]
    assert {KEY: 12} == sequencer.checkpoints()
    assert [] == gaps


def test_a_repeated_id_is_a_duplicate():
    """An id seen before is refused, so it never reaches the sink twice."""
    sequencer, _, _ = make()
    for i in (1, 2, 3):
        sequencer.accept(KEY, i)

    assert not sequencer.accept(KEY, 2)
    assert not sequencer.accept(KEY, 3)


def test_a_jump_opens_a_gap_that_holds_the_checkpoint_back():
    """Skipped ids form a gap, reported once, and the checkpoint stays below it."""
    sequencer, gaps, _ = make()
    for i in (1, 2, 6):
        sequencer.accept(KEY, i)

    assert [(3, 5)] == gaps
    assert [(3, 5)] == sequencer.gaps(KEY)
    assert {KEY: 2} == sequencer.checkpoints()
    assert 3 == sequencer.missing(KEY)


def test_late_arrivals_fill_the_gap_in_any_order():
    """Ids inside a gap are accepted once, from the stream or from REST, in any order."""
    sequencer, _, healed = make()
    for i in (1, 7):
        sequencer.accept(KEY, i)

    assert sequencer.accept(KEY, 4)
    assert sequencer.fill(KEY, 2)
    assert not sequencer.fill(KEY, 2)
    assert [(3, 3), (5, 6)] == sequencer.gaps(KEY)
    assert sequencer.fill(KEY, 3)
    assert sequencer.accept(KEY, 6)
    assert sequencer.fill(KEY, 5)
    assert [] == sequencer.gaps(KEY)
    assert {KEY: 7} == sequencer.checkpoints()
    assert [KEY, KEY] == healed


def test_fill_ignores_ids_beyond_the_stream():
    """A REST trade newer than anything streamed fills nothing."""
    sequencer, _, _ = make()
    sequencer.accept(KEY, 5)

    assert not sequencer.fill(KEY, 9)


def test_resume_continues_after_the_checkpoint():
    """After a restart the first live id shows the hole left by the last run."""
    sequencer, gaps, _ = make()
    sequencer.resume(KEY, 100)

    assert not sequencer.accept(KEY, 99)
    sequencer.accept(KEY, 120)
    assert [(101, 119)] == gaps
    assert {KEY: 100} == sequencer.checkpoints()


def test_refused_ids_become_one_merged_gap():
    """Ids the sink could not take become gaps; consecutive ones merge."""
    sequencer, gaps, _ = make()
    for i in range(1, 6):
        sequencer.accept(KEY, i)
    for i in (3, 4, 5):
        sequencer.mark_missing(KEY, i)

    assert [(3, 5)] == sequencer.gaps(KEY)
    assert [(3, 3)] == gaps
    assert {KEY: 2} == sequencer.checkpoints()


def test_give_up_releases_the_checkpoint():
    """Giving up on a range removes it and lets the checkpoint pass it."""
    sequencer, _, _ = make()
    for i in (1, 10, 20):
        sequencer.accept(KEY, i)

    assert 6 == sequencer.give_up(KEY, 0, 7)
    assert [(8, 9), (11, 19)] == sequencer.gaps(KEY)
    assert 2 == sequencer.give_up(KEY, 8, 9)
    assert {KEY: 10} == sequencer.checkpoints()


def test_sequences_are_independent_per_venue():
    """Binance.US ids are sequenced apart from Binance's."""
    sequencer, gaps, _ = make()
    us = StreamKey("BINANCE_US", "BTCUSDT", "trade")
    sequencer.accept(KEY, 1000)
    sequencer.accept(us, 5)
    sequencer.accept(KEY, 1001)
    sequencer.accept(us, 6)

    assert [] == gaps
    assert {KEY: 1001, us: 6} == sequencer.checkpoints()


def test_refusals_next_to_a_gap_join_it():
    """A refused id touching a gap on either side joins it instead of opening a new one."""
    sequencer, gaps, _ = make()
    for i in (1, 10):
        sequencer.accept(KEY, i)
    assert [(2, 9)] == gaps
    for i in range(2, 10):
        sequencer.fill(KEY, i)
    for i in (5, 3, 4, 7, 6):
        sequencer.mark_missing(KEY, i)

    assert [(3, 7)] == sequencer.gaps(KEY)
    assert [(2, 9), (5, 5), (3, 3), (7, 7)] == gaps
