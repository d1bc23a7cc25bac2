"""The one exception type that means "the user's input is wrong": the CLI prints it as one line, exit 2."""


class XpertError(Exception):
    """A problem with the user's input (file, option, spec). The message names the file or field."""
