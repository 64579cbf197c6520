"""The one exception type whose message the user sees as a single line, and how any exception becomes one line."""


class UserError(Exception):
    """Bad input or an unmet requirement: the message says what to do, in one line."""


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def exception_name(exc: BaseException) -> str:
    """The exception's class name, module-qualified where the bare name says nothing ("struct.error", not "error")."""
    name = type(exc).__name__
    return f"{type(exc).__module__}.{name}" if name.islower() else name
