"""The one exception family the CLI turns into a message and an exit code."""

# Exit codes, documented in the README's CLI reference.
EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_VERIFY_FAILED = 3
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM: 128 + SIGINT, as shells report it
EXIT_BROKEN_PIPE = 141  # the reader of stdout went away (`kiln targets | head -1`): 128 + SIGPIPE


def first_line(exc: BaseException) -> str:
    """The first line of exc's message (libraries' messages run on with logs and stack dumps), or the
    name of its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class KilnError(Exception):
    """An error with a message meant for the user: what is wrong, where, and what to do."""

    exit_code = EXIT_INTERNAL

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message}\n  hint: {self.hint}" if self.hint else self.message


class InputError(KilnError):
    """The user's model, options or files are not usable as given."""

    exit_code = EXIT_BAD_INPUT


class VerificationFailed(KilnError):
    """The optimized engine does not match the original model within tolerance."""

    exit_code = EXIT_VERIFY_FAILED
