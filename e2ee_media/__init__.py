"""End-to-end media encryption: SFrame (RFC 9605), SFrame keys from MLS (§5.2), frame transforms.

`aiortc_hooks` (imported separately, it pulls in aiortc) installs the transforms into aiortc.
"""

from .cipher_suites import CipherSuite
from .context import SFrameContext
from .errors import (
    AuthenticationFailure,
    CounterExhausted,
    KeyScheduleError,
    KeyUsageError,
    MalformedFrame,
    ReplayedFrame,
    SFrameError,
    UnknownKeyId,
    UnsupportedCipherSuite,
    WrongSender,
)
from .header import SFrameHeader
from .mls_keys import ExporterGroup, MLSKeyManager
from .transform import FrameDecryptor, FrameEncryptor, TrackStats

__all__ = [
    "AuthenticationFailure",
    "CipherSuite",
    "CounterExhausted",
    "ExporterGroup",
    "FrameDecryptor",
    "FrameEncryptor",
    "KeyScheduleError",
    "KeyUsageError",
    "MLSKeyManager",
    "MalformedFrame",
    "ReplayedFrame",
    "SFrameContext",
    "SFrameError",
    "SFrameHeader",
    "TrackStats",
    "UnknownKeyId",
    "UnsupportedCipherSuite",
    "WrongSender",
]
