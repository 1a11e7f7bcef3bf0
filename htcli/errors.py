"""Exceptions the library raises for user mistakes; the CLI prints them as one line."""


class HTError(Exception):
    """A problem the user can fix: the message says what is wrong and how to fix it."""
