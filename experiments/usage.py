"""What every command-line program starts and ends with: the usage check, and bad input reported as one line."""
import math
import sys

from absl import app, flags

from rstar_jax.errors import InputError


def check_usage(argv, *required: str) -> None:
    """No positional arguments, and each flag named in `required` given (a UsageError names what is wrong)."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    missing = [f"--{name}" for name in required if not flags.FLAGS[name].value]
    if missing:
        raise app.UsageError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")


def positive_ints(values: list[str]) -> bool:
    """A list flag's validator: every item a positive integer."""
    return bool(values) and all(v.strip().isdigit() and int(v) > 0 for v in values)


def run(main) -> None:
    """`app.run(main)` with bad input reported as its message alone, `<program>: error: ...` (exit status 1):
    a usage error, an `InputError` or a file that cannot be read or written (the message names the flag,
    file, line or field), and a float flag that is not finite (nan or inf: no setting means that)."""
    def checked_main(argv):
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        program = spec.name if spec else sys.argv[0]
        try:
            for name in flags.FLAGS:
                value = flags.FLAGS[name].value
                if isinstance(value, float) and not math.isfinite(value):
                    raise app.UsageError(f"--{name}={value} must be a finite number")
            return main(argv)
        except app.UsageError as e:  # absl would print the help of every flag first (hundreds of lines)
            raise SystemExit(f"{program}: error: {e} (--help lists the flags)") from None
        except (InputError, OSError) as e:
            raise SystemExit(f"{program}: error: {e}") from None
    app.run(checked_main)
