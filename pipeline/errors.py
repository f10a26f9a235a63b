"""Exceptions that the command line turns into a one-line message and exit code 2.

Library code raises these for problems the user can fix (a bad option, a missing file, a cache
that does not fit). Anything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """A user-fixable problem: the message names the value at fault and what to do."""


class WeightsUnavailableError(UsageError):
    """Published weights could not be fetched (for example without network)."""


class BadImageError(Exception):
    """An input file that cannot become an RGB view; the message is the reason it was skipped."""


class CacheMismatchError(UsageError):
    """A cache that does not fit the request: other settings, another student grid or input size."""


class CorruptCacheError(UsageError):
    """A cache whose bytes do not match the checksums in its manifest."""
