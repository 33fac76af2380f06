"""The error bad input raises: a file, record, directory or setting that is not what it must be."""


class InputError(ValueError):
    """Bad input, described by a message that names it (file, line, field, flag); the command-line programs
    print that message alone, without a traceback (`experiments.usage.run`)."""
