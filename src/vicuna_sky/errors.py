"""The one error type the CLI turns into a clear one-line message and a non-zero exit."""


class VicunaSkyError(Exception):
    """A user-facing problem: bad input, a broken spec, a failed run. Never a bug."""
