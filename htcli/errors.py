"""Exceptions the library raises for user mistakes; the CLI prints them as one line."""


class HTError(ValueError):
    """A problem the user can fix: the message says what is wrong and how to fix it, naming
    Python parameters (`layers=`); the CLI shows them as its options (`--layers`).

    A `ValueError`, so `except ValueError` catches a bad value given to the library."""
