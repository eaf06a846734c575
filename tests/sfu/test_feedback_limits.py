"""What one subscriber's feedback can make the SFU do: its REMBs cannot throttle a publisher
for everyone (draft-alvestrand-rmcat-remb)."""

from __future__ import annotations

from sfu import forwarding
from tests.sfu.test_forwarding import (
    make_slot,
    make_source,
    remb_bitrates,
)


def test_no_estimate_below_remb_min_is_relayed() -> None:
    """A subscriber claiming 1 bit/s must not set the publisher's encoder to 1 bit/s."""
    for kind in ("video", "audio"):  # libwebrtc applies a REMB to the whole connection
        source, up = make_source(kind=kind)
        slot, _ = make_slot(kind=kind, subscriber="mallory")
        slot.attach(source)
        slot.remb = (1, 1.0)
        source.relay_remb(now=1.0)
        slot.remb = (0, 2.5)
        source.relay_remb(now=2.5)
        assert [b for b, _ in remb_bitrates(up)] == [forwarding.REMB_MIN, forwarding.REMB_MIN]
    # an estimate above the floor is relayed as it is
    slot.remb = (forwarding.REMB_MIN + 1, 4.0)
    source.relay_remb(now=4.0)
    assert remb_bitrates(up)[-1] == (forwarding.REMB_MIN + 1, [1111])


def test_one_subscriber_far_below_the_others_cannot_drag_the_publisher_down() -> None:
    source, up = make_source()
    slots = {}
    for name, bitrate in (("a", 2_000_000), ("b", 1_500_000), ("c", 1_800_000)):
        slots[name], _ = make_slot(subscriber=name)
        slots[name].attach(source)
        slots[name].remb = (bitrate, 1.0)
    # mallory has two slots on this source: its estimates count once, not as two subscribers
    for mid in ("m1", "m2"):
        slots[mid], _ = make_slot(subscriber="mallory")
        slots[mid].attach(source)
        slots[mid].remb = (200_000, 1.0)
    source.relay_remb(now=1.0)
    assert [b for b, _ in remb_bitrates(up)] == [1_500_000]
    # however often it says so
    for k in range(1, 30):
        slots["m1"].remb = slots["m2"].remb = (150_000 - k * 1000, 1.0 + k * 0.1)
        source.relay_remb(now=1.0 + k * 0.1)
    assert {b for b, _ in remb_bitrates(up)} == {1_500_000}
    # a congested room (most subscribers slow) still lowers the publisher at once, within
    # REMB_INTERVAL of the last relay
    slots["a"].remb = (400_000, 4.05)
    slots["b"].remb = (300_000, 4.05)
    source.relay_remb(now=4.05)
    assert remb_bitrates(up)[-1] == (300_000, [1111])
    # with two subscribers, either is as likely the slow one: the lower counts (floored)
    for name in ("a", "c"):
        slots[name].attach(None)
    source.tick(now=6.0)
    assert remb_bitrates(up)[-1][0] == forwarding.REMB_MIN
