"""The "pyalign" logger: what pyalign tells its user about changes it makes to their stack (for
example which TRL functions ``pyalign.integrations.trl.enable()`` replaced).

Records of level INFO and above are shown by default: while the program has configured no
logging (the root logger has no handler) they are printed on stderr as ``pyalign: message``;
once it has, they go to its handlers only (so nothing is printed twice).
``logging.getLogger("pyalign").setLevel(logging.WARNING)`` silences them.
"""
from __future__ import annotations

import logging
import sys

NAME = "pyalign"


class _UnconfiguredStderrHandler(logging.Handler):
    """Prints a record on the current sys.stderr unless the root logger has a handler."""

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # a closed stderr: like logging's own handlers, never raise
            self.handleError(record)


def get_logger(name: str = NAME) -> logging.Logger:
    """The logger ``name`` (a child of "pyalign"), the "pyalign" one set up on first use."""
    root = logging.getLogger(NAME)
    if not any(isinstance(h, _UnconfiguredStderrHandler) for h in root.handlers):
        handler = _UnconfiguredStderrHandler()
        handler.setFormatter(logging.Formatter(f"{NAME}: %(message)s"))
        root.addHandler(handler)
        if root.level == logging.NOTSET:
            root.setLevel(logging.INFO)
    return logging.getLogger(name)
