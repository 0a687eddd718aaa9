"""One exception type for bad input, so the entry point can print it as a single clear line."""


class QatlabError(ValueError):
    """A user-facing error: the message names the bad key or value and says what to do instead."""


def require(condition: bool, message: str) -> None:
    """Raise QatlabError(message) unless condition holds."""
    if not condition:
        raise QatlabError(message)


class Interrupted(QatlabError):
    """SIGINT/SIGTERM stopped the run; the message says what was saved and how to resume."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class RunFailed(QatlabError):
    """The run finished but its result is unusable (e.g. a non-finite PPL); it is already recorded as failed."""

    recorded = True
