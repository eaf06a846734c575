"""The safety code: a short number derived from the epoch authenticator (RFC 9420 §8.7).

Every member of one epoch computes the same code, and nobody outside the epoch can: members
compare it out of band (read aloud in the call) to detect a delivery service that split them
into different groups. It changes with every epoch.
"""

from __future__ import annotations

import hashlib

SAFETY_LABEL = b"Conclave safety code v1"
GROUPS = 4
DIGITS = 5


def safety_code(epoch_authenticator: bytes) -> str:
    """``"01234 56789 ..."``: GROUPS groups of DIGITS decimal digits (about 66 bits)."""
    if not epoch_authenticator:
        raise ValueError("the epoch authenticator is empty")
    digest = hashlib.sha256(SAFETY_LABEL + bytes(epoch_authenticator)).digest()
    groups = []
    for i in range(GROUPS):
        # 5 bytes (40 bits) per group reduced mod 10^5: the bias is below 2^-23.
        value = int.from_bytes(digest[5 * i : 5 * i + 5], "big") % 10**DIGITS
        groups.append(f"{value:0{DIGITS}d}")
    return " ".join(groups)
