"""What one subscriber's feedback can make the SFU do: its REMBs cannot throttle a publisher
for everyone, its NACKs cannot multiply the SFU's output (draft-alvestrand-rmcat-remb, RFC 4585).
"""

from __future__ import annotations

from sfu import forwarding
from sfu.forwarding import CACHE_SIZE, SourceStream
from sfu.rtp import parse_rtp
from tests.sfu.test_forwarding import (
    KEY,
    make_slot,
    make_source,
    remb_bitrates,
    rtp_packet,
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


def _feed(
    source: SourceStream, first: int, count: int, t0: float, payload: bytes, fps: int = 30
) -> float:
    """`count` packets, one per frame at `fps`, from `t0`; returns the next packet's time."""
    t = t0
    for i in range(first, first + count):
        ts = (90000 // fps * i) & 0xFFFFFFFF
        source.handle_rtp(rtp_packet(i & 0xFFFF, ts, payload), now=t)
        t += 1 / fps
    return t


def test_a_packet_is_resent_at_most_resend_max_times() -> None:
    source, _ = make_source()
    slot, down = make_slot()
    slot.attach(source)
    _feed(source, 100, 20, 0.0, KEY)
    wanted = [parse_rtp(p).sequence_number for p in down.packets[:5]]
    for k in range(6):  # asked again and again, each time after RESEND_INTERVAL
        slot.retransmit(wanted, now=0.7 + k * 0.06)
    assert len(down.packets) == 20 + forwarding.RESEND_MAX * 5
    assert down.packets[20:] == down.packets[:5] * forwarding.RESEND_MAX
    assert slot.metrics.retransmissions_sent == forwarding.RESEND_MAX * 5


def test_a_packet_nacked_again_seconds_later_is_still_resent() -> None:
    """aiortc NACKs a missing packet again only when a new gap appears. A packet the publisher
    lost too (the first NACK finds nothing), whose late repair is then lost on the way down,
    is asked for again only at the subscriber's next loss, maybe seconds later; while the
    source keeps it, it must be resent, or the subscriber's stream stalls for good."""
    source, _ = make_source()
    slot, down = make_slot()
    slot.attach(source)
    t = _feed(source, 100, 10, 0.0, KEY)
    t = _feed(source, 111, 5, t + 1 / 30, KEY)  # 110 lost upstream
    first = parse_rtp(down.packets[0]).sequence_number
    wanted = (first + 10) & 0xFFFF
    slot.retransmit([wanted], now=t)
    assert len(down.packets) == 15  # not there yet: nothing to resend
    source.handle_rtp(rtp_packet(110, 3000 * 110, KEY), now=t)  # the publisher's repair ...
    assert parse_rtp(down.packets[-1]).sequence_number == wanted  # ... lost on the way down
    t = _feed(source, 116, 90, t, KEY)  # three seconds without another loss
    sent = len(down.packets)
    slot.retransmit([wanted], now=t)
    assert down.packets[sent:] == [down.packets[15]]


def test_a_nack_flood_costs_at_most_a_share_of_the_subscribers_own_stream() -> None:
    """A subscriber NACKing the whole cache every 20 ms (the reviewer's attack) gets at most
    RESEND_SHARE of what it is forwarded (plus RESEND_BURST) resent; another subscriber's
    repair goes on as before."""
    source, _ = make_source()
    mallory, flooded = make_slot(subscriber="mallory")
    victim, victim_down = make_slot(subscriber="victim")
    mallory.attach(source)
    victim.attach(source)
    payload = KEY + bytes(1000)
    t = 0.0
    victim_repairs = 0
    for k in range(1500):  # 30 s, a packet and the flood's NACK of the whole cache every 20 ms
        t = round(_feed(source, 100 + k, 1, t, payload, fps=50), 6)
        last = parse_rtp(flooded.packets[-1]).sequence_number
        mallory.retransmit([(last - i) & 0xFFFF for i in range(CACHE_SIZE)], now=t)
        if k % 20 == 19:  # the victim loses one packet in 20 and NACKs it
            lost = victim_down.packets[-2]
            victim.retransmit([parse_rtp(lost).sequence_number], now=t)
            assert victim_down.packets[-1] == lost
            victim_repairs += 1
    live = 1500 * len(payload)
    resent = mallory.packets_sent - 1500
    # RESEND_MAX resends of each packet of the last second would be 6000: the budget binds
    assert 0 < resent * len(payload) <= forwarding.RESEND_BURST + forwarding.RESEND_SHARE * live
    assert mallory.octets_sent - live == resent * len(payload)
    assert victim.packets_sent == 1500 + victim_repairs == 1575
