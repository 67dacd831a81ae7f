"""Errors of the data path: one line that names the file and says what is wrong with it."""

from __future__ import annotations

import os

from hlip_fed.errors import HlipError


class DataError(HlipError):
    """A scan, report or site folder that cannot be used.

    The message is always ``"<path>: <reason>"`` on one line, so that ``site check`` can list
    problems and training can log a skipped study without a traceback.
    """

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = " ".join(str(reason).split())  # one line, whatever the cause said
        super().__init__(f"{self.path}: {self.reason}")
