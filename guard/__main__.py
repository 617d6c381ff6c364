"""`python -m guard`: the command line in guard.cli."""
import os
import sys

from .cli import main


def _run() -> int:
    try:
        return main()
    except BrokenPipeError:
        # The reader of stdout went away (`python -m guard doctor | head -1`): stop quietly, and
        # point stdout at /dev/null so that flushing it at exit does not fail a second time.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(_run())
