"""Test isolation shared by every package's tests."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """Undo logger levels and root handlers a test changed (the CLI's `main()`, run in-process,
    quiets library loggers for its users), so that no test sees another's logging set-up."""
    manager = logging.Logger.manager
    levels = {
        name: logger.level
        for name, logger in manager.loggerDict.items()
        if isinstance(logger, logging.Logger)
    }
    root = logging.getLogger()
    root_level, root_handlers = root.level, list(root.handlers)
    yield
    for name, logger in list(manager.loggerDict.items()):
        if isinstance(logger, logging.Logger):
            logger.setLevel(levels.get(name, logging.NOTSET))
    root.setLevel(root_level)
    for handler in root.handlers[:]:
        # basicConfig's handler; pytest's own capture handlers come and go by themselves.
        if type(handler) is logging.StreamHandler and handler not in root_handlers:
            root.removeHandler(handler)
