from __future__ import annotations

from sfu.speaker import ActiveSpeakerDetector


def test_loudest_above_threshold_wins_with_hysteresis() -> None:
    d = ActiveSpeakerDetector(threshold_dbov=60, hysteresis_db=3)
    for _ in range(5):
        d.add_level("a", 127)
        d.add_level("b", 127)
    assert d.tick() is None  # silence: nobody speaks
    d.add_level("a", 30)
    d.add_level("b", 50)
    assert d.tick() == "a"
    d.add_level("a", 30)
    assert d.tick() is None  # unchanged
    d.add_level("a", 31)
    d.add_level("b", 30)  # louder by 1 dB only: no switch
    assert d.tick() is None and d.speaker == "a"
    d.add_level("a", 40)
    d.add_level("b", 30)
    assert d.tick() == "b"
    d.add_level("a", 20)
    d.add_level("b", 127)
    assert d.tick() == "a"  # the current speaker fell silent
    d.remove("a")
    assert d.speaker is None
