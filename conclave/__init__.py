"""conclave: end-to-end encrypted group calls (the application layer).

`conclave.Participant` is the call participant; `conclave.safety_code` the out-of-band check;
`conclave.audit` the secret-free log auditor. Imported lazily: the CLI starts without aiortc.
"""

from __future__ import annotations

from typing import Any

__all__ = ["Participant", "safety_code"]


def __getattr__(name: str) -> Any:
    if name == "Participant":
        from .participant import Participant

        return Participant
    if name == "safety_code":
        from .safety import safety_code

        return safety_code
    raise AttributeError(f"module 'conclave' has no attribute {name!r}")
