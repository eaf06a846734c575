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


FINGERPRINT_LABEL = b"Conclave key fingerprint v1"
FINGERPRINT_BYTES = 16


def key_fingerprint(signature_key: bytes) -> str:
    """``"1a2b 3c4d ..."``: 8 groups of 4 hex digits (128 bits) of a signature public key.

    What ties a name in an audit log to a person: each member reads its own (`conclave join`
    prints it) and an auditor checks the log's against them (`conclave audit --expect-key`)."""
    digest = hashlib.sha256(FINGERPRINT_LABEL + bytes(signature_key)).hexdigest()
    return " ".join(digest[i : i + 4] for i in range(0, 2 * FINGERPRINT_BYTES, 4))


def normalize_fingerprint(text: str) -> str:
    """A fingerprint as typed (any case, spaces or colons or none) in `key_fingerprint`'s form;
    ValueError if it is not 32 hex digits."""
    digits = "".join(c for c in text.lower() if c not in " :-")
    if len(digits) != 2 * FINGERPRINT_BYTES or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"a key fingerprint is {2 * FINGERPRINT_BYTES} hex digits")
    return " ".join(digits[i : i + 4] for i in range(0, len(digits), 4))
