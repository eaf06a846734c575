from __future__ import annotations

from sfu.speaker import ActiveSpeakerDetector


def _interval(d: ActiveSpeakerDetector, levels: dict[str, int], packets: int = 15) -> str | None:
    """One speaker interval of 20 ms audio packets at these levels (-dBov), then its decision."""
    for _ in range(packets):
        for identity, level in levels.items():
            d.add_level(identity, level)
    return d.tick()


def _decide(d: ActiveSpeakerDetector, levels: dict[str, int]) -> str | None:
    """Two intervals alike: what a steady situation decides."""
    first = _interval(d, levels)
    second = _interval(d, levels)
    assert first is None  # never on one interval alone
    return second


def test_loudest_above_threshold_wins_with_hysteresis() -> None:
    d = ActiveSpeakerDetector(threshold_dbov=60, hysteresis_db=3)
    assert _decide(d, {"a": 127, "b": 127}) is None  # silence: nobody speaks
    assert _decide(d, {"a": 30, "b": 50}) == "a"
    assert _decide(d, {"a": 30}) is None  # unchanged
    assert _decide(d, {"a": 31, "b": 30}) is None  # louder by 1 dB only: no switch
    assert d.speaker == "a"
    assert _decide(d, {"a": 40, "b": 30}) == "b"
    assert _decide(d, {"a": 20, "b": 127}) == "a"  # the current speaker fell silent
    d.remove("a")
    assert d.speaker is None


def test_one_loud_packet_does_not_take_the_floor() -> None:
    d = ActiveSpeakerDetector()
    assert _decide(d, {"a": 30}) == "a"
    # b coughs once while a goes on talking: a single packet at 0 dBov in one interval
    d.add_level("b", 0)
    assert _interval(d, {"a": 30}) is None and d.speaker == "a"
    assert _interval(d, {"a": 30}) is None and d.speaker == "a"
    # the same in a quiet room: one packet from c does not make c the speaker
    quiet = ActiveSpeakerDetector()
    quiet.add_level("c", 10)
    assert quiet.tick() is None
    assert _interval(quiet, {"c": 127}) is None and quiet.speaker is None
    # two voices alternating loudest interval by interval: no flapping either
    assert _interval(d, {"a": 30, "b": 20}) is None
    assert _interval(d, {"a": 20, "b": 30}) is None
    assert _interval(d, {"a": 30, "b": 20}) is None
    assert d.speaker == "a"
    # a challenger that leaves (and comes back) before it is confirmed starts over
    d.remove("b")
    assert _interval(d, {"a": 30, "b": 20}) is None and d.speaker == "a"
    assert _interval(d, {"a": 30, "b": 20}) == "b"


def test_the_level_is_minus_dbov_zero_loudest() -> None:
    d = ActiveSpeakerDetector(threshold_dbov=60)
    assert _decide(d, {"near": 10, "far": 55}) == "near"
    d = ActiveSpeakerDetector(threshold_dbov=60)
    assert _decide(d, {"hum": 61}) is None  # quieter than -60 dBov: not speech
