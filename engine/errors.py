"""The one exception type sdrt raises for bad input: the CLI prints its message on one line."""


class SdrtError(ValueError):
    """Bad input a user can fix: a missing file, a shape that does not fit, an unknown name.

    A ``ValueError``, so code that guards a call with ``except ValueError`` catches it too.
    """
