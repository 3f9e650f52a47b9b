"""Errors a user can fix (bad path, config, or data). The CLI prints them as one line, no traceback."""


class UserError(Exception):
    """A mistake in the user's input; the message says what and where."""


class UnusableInputError(UserError):
    """The input cannot be read at all (no such file, empty, unknown format, missing columns)."""


class TooManyInvalidRowsError(UserError):
    """Validation quarantined more rows than `max_invalid_fraction` allows."""
