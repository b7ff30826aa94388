"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class DeepPoseError(Exception):
    """A problem the user can fix (bad input, missing file, failed download).

    The CLI prints ``Error: <message>`` and exits with ``exit_code``; anything else that
    escapes is a bug and keeps its traceback.
    """

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
