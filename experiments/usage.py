"""The usage check every command-line program starts with."""
from absl import app, flags


def check_usage(argv, *required: str) -> None:
    """No positional arguments, and each flag named in `required` given (a UsageError names what is wrong)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    missing = [f"--{name}" for name in required if not flags.FLAGS[name].value]
    if missing:
        raise app.UsageError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")
