"""The one exception shape for inputs the data stages reject (recorded as a row, never raised out)."""

from __future__ import annotations


class RejectedInput(ValueError):
    """An input that cannot be used; ``code`` is a stable short name for summaries, ``message`` says
    what is wrong in words a user can act on."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message
