class SumtuneError(Exception):
    """A problem with the user's input or environment, reported as one sentence (CLI exit status 2)."""
