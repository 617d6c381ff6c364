"""python -m cpp_ext {build,status,compile-cuda}: build, report on, or nvcc-check the extension.

cpp_ext imports nothing from guard, so this entry point cannot use guard.console; it keeps
its own small main with the same exit codes and the same output format as every other
`python -m` entry point (guard/console.py, docs/cli.md):

    0  success (the report is printed as JSON on stdout either way)
    1  unexpected error (a bug: its traceback is printed above the error line)
    2  bad arguments
    3  the operators are unavailable: the build failed or a tool it needs (a C++ compiler,
       ninja, nvcc) is missing
    4  nvcc ran but a CUDA kernel did not compile, link or export its C interface
  130  interrupted (Ctrl-C)

Failures are one `error: ...` line on stderr; logs go to stderr as `LEVEL name: message`.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import traceback

from . import _build
from .errors import ExtensionError, ExtensionUnavailableError
from .nvcc import ARCHITECTURES, compile_cuda_kernels

log = logging.getLogger("cpp_ext")

EXIT_OK, EXIT_UNEXPECTED, EXIT_USAGE, EXIT_MODEL, EXIT_EXPORT, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130
EPILOG = ("exit codes: 0 success; 1 unexpected error (a bug: its traceback is printed above the error line); "
          "2 bad arguments; "
          "3 the operators are unavailable (a failed build, a missing compiler, ninja or nvcc); "
          "4 a CUDA kernel did not compile; 130 interrupted (Ctrl-C)")


class CompileError(ExtensionError, RuntimeError):
    """nvcc ran, but a CUDA kernel did not compile, link or export its C interface."""


def _build_or_status(command: str, verbose: bool) -> int:
    if command == "build":
        _build.load(verbose=verbose)
    report = _build.status()
    print(json.dumps(report, indent=2))
    if not report["available"]:
        raise ExtensionUnavailableError(f"the clip_guard C++ extension is not available ({report['error_summary']}); "
                                        f"{_build.BUILD_HINT}")
    return EXIT_OK


def _compile_cuda(out: str | None, architectures: list[str]) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        result = compile_cuda_kernels(out or scratch, architectures=architectures)
        print(json.dumps(result.to_dict(), indent=2))
    if result.nvcc is None:
        raise ExtensionUnavailableError("nvcc was not found: set CUDA_HOME or put nvcc on PATH")
    if not result.ok:
        raise CompileError(f"the CUDA kernels did not compile for {', '.join(architectures)} with {result.nvcc}; "
                           "the JSON report's log has nvcc's output")
    return EXIT_OK


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cpp_ext", epilog=EPILOG,
        description="The clip_guard C++/CUDA operators: build them, report on them, or compile the CUDA kernels "
                    "with nvcc (no GPU needed).")
    parser.add_argument("-v", dest="debug", action="store_true", help="debug logs")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or load the cached build) and print the status as JSON")
    build.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    commands.add_parser("status", help="print the status as JSON (builds first, like build, if nothing is cached)")
    cuda = commands.add_parser("compile-cuda", help="compile csrc/cuda with nvcc for the given architectures")
    cuda.add_argument("--out", help="output directory (default: a temporary one)")
    cuda.add_argument("--arch", nargs="+", default=list(ARCHITECTURES), help="default: %(default)s")
    args = parser.parse_args(argv)
    # As guard.console.setup_logging: our loggers at INFO (DEBUG with -v), other libraries' at WARNING.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(logging.DEBUG if args.debug else logging.INFO)

    if args.command in ("build", "status"):
        return _build_or_status(args.command, verbose=getattr(args, "verbose", False))
    return _compile_cuda(args.out, args.arch)


def run(argv=None) -> int:
    """`main` with guard.console.run's contract: a typed error is one line on stderr and its code."""
    try:
        return main(argv)
    except SystemExit as exit:  # --help (0) and argparse's usage errors (2)
        return exit.code if isinstance(exit.code, int) else EXIT_USAGE
    except CompileError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_EXPORT
    except ExtensionError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_MODEL
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:
        traceback.print_exc(file=sys.stderr)  # a bug: its report needs the traceback
        print(f"error: unexpected {type(error).__name__}: {error} (a bug in clip-guard or its dependencies)",
              file=sys.stderr)
        return EXIT_UNEXPECTED


if __name__ == "__main__":
    sys.exit(run())
