"""guard.console: the exit-code table, the entry-point wrapper and progress in logs."""
from __future__ import annotations

import pytest

from guard import console
from guard.errors import (ArtifactError, ChecksumError, DataError, ExportError, InputError, MissingDependencyError,
                          ModelLoadError, ServiceError)


@pytest.mark.parametrize("error, code", [
    (InputError("x"), console.EXIT_USAGE), (DataError("x"), console.EXIT_USAGE),
    (ModelLoadError("x"), console.EXIT_MODEL), (ArtifactError("x"), console.EXIT_MODEL),
    (ChecksumError("x"), console.EXIT_MODEL), (MissingDependencyError("x"), console.EXIT_MODEL),
    (ServiceError("x"), console.EXIT_MODEL), (ExportError("x"), console.EXIT_EXPORT),
    (RuntimeError("x"), console.EXIT_UNEXPECTED)])
def test_every_error_has_its_documented_code(error, code):
    assert console.exit_code(error) == code
    assert code in console.EXIT_CODES and str(code) in console.EPILOG


def test_run_turns_errors_into_one_line_and_a_code(capsys):
    def failing(error):
        def main(argv):
            raise error
        return main

    assert console.run(failing(ArtifactError("no manifest in /x"))) == console.EXIT_MODEL
    assert capsys.readouterr().err == "error: no manifest in /x\n"
    assert console.run(failing(KeyError("k"))) == console.EXIT_UNEXPECTED
    assert "unexpected KeyError" in capsys.readouterr().err
    assert console.run(failing(KeyboardInterrupt())) == console.EXIT_INTERRUPTED
    assert console.run(failing(SystemExit(0))) == 0
    assert console.run(lambda argv: console.EXIT_OK) == 0
    with pytest.raises(BrokenPipeError):
        console.run(failing(BrokenPipeError()))


def test_progress_prints_a_line_every_tenth_when_not_a_terminal(capsys):
    assert list(console.progress(range(50), desc="steps")) == list(range(50))
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "steps: 10 % (5/50)" and lines[-1] == "steps: 100 % (50/50)" and len(lines) == 10
    with console.progress(total=3, desc="manual") as bar:
        for _ in range(3):
            bar.update()
    assert capsys.readouterr().err.splitlines()[-1] == "manual: 100 % (3/3)"
    assert list(console.progress(range(4), enabled=False)) == [0, 1, 2, 3]
    assert capsys.readouterr().err == ""
