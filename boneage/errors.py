"""The one exception type for bad user input.

Anything a user can get wrong (a config key, a CSV row, an image file, a CLI flag) raises
`InputError` with a message that names the key, row or file. The CLIs catch it, print the
message and exit with status 2, so users never see a bare traceback for their own mistakes.
Status 2 means bad input and nothing else: code catches only what it knows is the user's fault
(a file that is not a PNG, a URL that names no database), so a genuine fault (a bug, a locked
database, a model from a newer Keras) keeps its traceback and exits with status 1.
"""

EXIT_BAD_INPUT = 2


class InputError(Exception):
    """Bad user input. The message alone must tell the user what to fix."""


def summarize(items, limit: int = 5) -> str:
    """'a, b, c (and 12 more)': the first few offenders and the count, for error messages."""
    items = [str(i) for i in items]
    head = ", ".join(items[:limit])
    return head if len(items) <= limit else f"{head} (and {len(items) - limit} more; {len(items)} in all)"
