"""What every `python -m` entry point shares: one exit-code table, one logging set-up and
progress that suits where the output goes (docs/cli.md).

    def main(argv=None) -> int: ...          # returns EXIT_OK or raises a typed error
    if __name__ == "__main__":
        sys.exit(console.run(main))
"""
from __future__ import annotations

import logging
import sys
import traceback
from typing import Callable, Iterable, Iterator, Optional, Sequence

from .errors import (ArtifactError, ClipGuardError, ExportError, MissingDependencyError, ModelLoadError,
                     ServiceError)

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_USAGE = 2
EXIT_MODEL = 3
EXIT_EXPORT = 4
EXIT_INTERRUPTED = 130

EXIT_CODES = {
    EXIT_OK: "success",
    EXIT_UNEXPECTED: "unexpected error (a bug: its traceback is printed above the error line)",
    EXIT_USAGE: "bad arguments or input (an unreadable image, a missing data set)",
    EXIT_MODEL: "unusable model or artifact, a missing optional dependency or an unreachable model server",
    EXIT_EXPORT: "an export failed or the compiled model disagrees with the torch reference",
    EXIT_INTERRUPTED: "interrupted (Ctrl-C)",
}
EPILOG = "exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items())

# The most specific class first: ChecksumError is an ArtifactError, and so on.
_CODE_OF = ((ExportError, EXIT_EXPORT),
            ((ArtifactError, ModelLoadError, MissingDependencyError, ServiceError), EXIT_MODEL),
            (ClipGuardError, EXIT_USAGE))
OUR_LOGGERS = ("guard", "training", "export", "cpp_ext", "benchmarks")


def exit_code(error: BaseException) -> int:
    """The exit code of an entry point that ends with `error`."""
    for kinds, code in _CODE_OF:
        if isinstance(error, kinds):
            return code
    return EXIT_UNEXPECTED


def setup_logging(verbose: int = 0, default: int = logging.INFO) -> None:
    """Our loggers at `default` (DEBUG with -v), other libraries' at WARNING, on stderr."""
    level = logging.DEBUG if verbose > 0 else default
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in OUR_LOGGERS:
        logging.getLogger(name).setLevel(level)


def fail(message: object) -> None:
    """One line on stderr, whatever the message's own line breaks (logs read errors line by line)."""
    print("error: " + " ".join(str(message).split()), file=sys.stderr)


def run(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]] = None) -> int:
    """Run an entry point's `main`: a typed error becomes one line on stderr and its exit
    code, never a traceback; help and argparse's usage errors keep their codes (0, 2)."""
    try:
        return main(argv)
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE
    except ClipGuardError as error:
        fail(error)
        return exit_code(error)
    except KeyboardInterrupt:
        fail("interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        raise  # the reader went away (`| head`); the caller exits quietly
    except Exception as error:
        # A bug: its report needs the traceback, which typed errors never print.
        traceback.print_exc(file=sys.stderr)
        fail(f"unexpected {type(error).__name__}: {error} (a bug in clip-guard or its dependencies)")
        return EXIT_UNEXPECTED


class _Lines:
    """Progress for logs: one line each time another `every` of the work is done."""

    def __init__(self, iterable: Optional[Iterable], total: Optional[int], desc: str, every: float = 0.1):
        self.iterable, self.desc, self.every = iterable, desc, every
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.done = 0
        self.next_mark = every

    def __iter__(self) -> Iterator:
        for item in self.iterable:
            yield item
            self.update()

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.total:
            return
        fraction = self.done / self.total
        if fraction >= self.next_mark or self.done == self.total:
            print(f"{self.desc}: {100 * fraction:.0f} % ({self.done}/{self.total})", file=sys.stderr, flush=True)
            while self.next_mark <= fraction:
                self.next_mark += self.every

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Silent(_Lines):
    def update(self, n: int = 1) -> None:
        self.done += n


def progress(iterable: Optional[Iterable] = None, total: Optional[int] = None, desc: str = "",
             enabled: bool = True):
    """A progress bar on a terminal, a line every 10 % in a log, nothing when not
    `enabled`. Iterate over it, or call update(n) and close()."""
    if not enabled:
        return _Silent(iterable, total, desc)
    if sys.stderr.isatty():
        try:
            from tqdm.auto import tqdm
        except ImportError:  # a serving install has no tqdm
            pass
        else:
            return tqdm(iterable, total=total, desc=desc)
    return _Lines(iterable, total, desc)
