"""The one error type users see: a sentence that says what is wrong and what to do."""


class MergeguardError(Exception):
    """A problem with the user's input or environment, reported as one sentence (exit code 2)."""
