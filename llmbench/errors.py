"""The one exception type whose message the user sees as a single line."""


class UserError(Exception):
    """Bad input or an unmet requirement: the message says what to do, in one line."""
