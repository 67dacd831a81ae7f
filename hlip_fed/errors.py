"""The project's error type: a problem a person can fix, reported as one line without a traceback.

Library code raises :class:`HlipError` (or a subclass) with a message that names the file, site or
key involved and the reason; the command line prints ``error: <message>`` and exits non-zero.
"""


class HlipError(Exception):
    """A user-facing failure: bad input, bad configuration, unreachable peer."""
