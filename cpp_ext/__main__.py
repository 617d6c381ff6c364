"""python -m cpp_ext {build,status,compile-cuda}: build, report on, or nvcc-check the extension."""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile

from . import _build
from .nvcc import ARCHITECTURES, compile_cuda_kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cpp_ext", description="The clip_guard C++/CUDA operators: build them, report on them, or "
        "compile the CUDA kernels with nvcc (no GPU needed). Exit status 0 on success, 1 on failure.")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="build (or load the cached build) and print the status as JSON")
    build.add_argument("--verbose", action="store_true", help="show the compiler commands and output")
    commands.add_parser("status", help="print the status as JSON (builds first, like build, if nothing is cached)")
    cuda = commands.add_parser("compile-cuda", help="compile csrc/cuda with nvcc for the given architectures")
    cuda.add_argument("--out", help="output directory (default: a temporary one)")
    cuda.add_argument("--arch", nargs="+", default=list(ARCHITECTURES), help="default: %(default)s")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command in ("build", "status"):
        if args.command == "build":
            _build.load(verbose=args.verbose)
        report = _build.status()
        print(json.dumps(report, indent=2))
        return 0 if report["available"] else 1
    with tempfile.TemporaryDirectory() as scratch:
        result = compile_cuda_kernels(args.out or scratch, architectures=args.arch)
        report = result.to_dict()
        print(json.dumps(report, indent=2))
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
