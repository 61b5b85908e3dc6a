"""The one exception type for user errors; the CLI turns it into one line and exit code 2."""


class MixerError(Exception):
    """A problem with the user's input (a param, a file, a folder); never a bug."""
