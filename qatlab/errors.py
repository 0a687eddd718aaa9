"""One exception type for bad input, so the entry point can print it as a single clear line."""


class QatlabError(ValueError):
    """A user-facing error: the message names the bad key or value and says what to do instead."""


def require(condition: bool, message: str) -> None:
    """Raise QatlabError(message) unless condition holds."""
    if not condition:
        raise QatlabError(message)
