"""The one exception type for bad input (files, plans, arguments)."""


class EplbInputError(ValueError):
    """Bad input: the message names the file/key/layer, what was expected and what was found.

    The CLI prints it as a single line and exits non-zero.
    """
