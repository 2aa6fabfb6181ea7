"""The one exception type that reaches users as a sentence, not a traceback."""


class AphqError(Exception):
    """A failure caused by the user's input or environment.

    The CLI prints ``str(err)`` as one sentence and exits non-zero; the
    traceback is shown only with ``--verbose``. Raise it with a message that
    names the bad input (a path, an option, a key) and, where there is one,
    the fix.
    """

    exit_code = 2
