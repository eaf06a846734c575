"""Active-speaker detection from RFC 6464 audio levels (the SFU never decodes audio).

Each audio packet carries the publisher's level in -dBov (0 loudest, 127 silence). Per interval
the detector averages each participant's loudness; the loudest participant above a threshold
becomes the speaker, with hysteresis so that the speaker does not flap between two voices, and
only after winning `confirm_intervals` intervals in a row: one loud packet (a cough, a click,
a burst of noise) lies in one interval, and must not take the floor for it.

The V (voice activity) bit is not used: aiortc always sends it clear, even for speech.
"""

from __future__ import annotations

SILENCE_DBOV = 127


class ActiveSpeakerDetector:
    def __init__(
        self, threshold_dbov: int = 60, hysteresis_db: float = 3.0, confirm_intervals: int = 2
    ) -> None:
        # A participant speaks if its mean level is louder than -threshold_dbov.
        self.threshold = SILENCE_DBOV - threshold_dbov
        self.hysteresis = hysteresis_db
        self.confirm_intervals = confirm_intervals
        self._sums: dict[str, int] = {}
        self._counts: dict[str, int] = {}
        self.speaker: str | None = None
        # who would have taken over in the last intervals, and in how many of them in a row
        self._challenger: str | None = None
        self._wins = 0

    def add_level(self, identity: str, level_dbov: int) -> None:
        """Record one packet's level (-dBov, 0..127)."""
        self._sums[identity] = self._sums.get(identity, 0) + (SILENCE_DBOV - level_dbov)
        self._counts[identity] = self._counts.get(identity, 0) + 1

    def remove(self, identity: str) -> None:
        self._sums.pop(identity, None)
        self._counts.pop(identity, None)
        if self.speaker == identity:
            self.speaker = None
        if self._challenger == identity:
            self._challenger = None
            self._wins = 0

    def tick(self) -> str | None:
        """Close the interval; return the new speaker if it changed, else None."""
        loudness = {i: self._sums[i] / self._counts[i] for i in self._sums if self._counts[i]}
        self._sums.clear()
        self._counts.clear()
        challenger = self._winner(loudness)
        if challenger != self._challenger:
            self._challenger = challenger
            self._wins = 0
        if challenger is None:
            return None
        self._wins += 1
        if self._wins < self.confirm_intervals:
            return None
        self.speaker = challenger
        self._challenger = None
        self._wins = 0
        return challenger

    def _winner(self, loudness: dict[str, float]) -> str | None:
        """Who would take over from the current speaker in this interval, if anyone."""
        if not loudness:
            return None
        best = max(loudness, key=lambda i: (loudness[i], i))
        if loudness[best] < self.threshold or best == self.speaker:
            return None
        current = loudness.get(self.speaker, 0.0) if self.speaker else 0.0
        if self.speaker is not None and current >= self.threshold:
            if loudness[best] < current + self.hysteresis:
                return None
        return best
