"""Sealed JSON documents: the artifact manifest and the compiled-model sidecar.

A sealed document carries the sha256 of its own canonical JSON (under a checksum
key) and a `files` table with the sha256 of every file it vouches for, so a flipped
byte in the document or in any listed file is caught when it is read.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from . import __version__
from .errors import ArtifactError, ChecksumError
from .hashing import sha256_bytes, sha256_file


def _canonical(document: dict, checksum_key: str) -> bytes:
    body = {key: value for key, value in document.items() if key != checksum_key}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def seal(document: dict, checksum_key: str) -> dict:
    """Set document[checksum_key] to the sha256 of the rest of the document; returns it."""
    document[checksum_key] = sha256_bytes(_canonical(document, checksum_key))
    return document


def write_sealed(path: Path, document: dict, checksum_key: str) -> None:
    """Seal the document and write it to path atomically: a crash mid-write leaves the old
    file in place, never a half-written one (calibration rewrites manifests in place)."""
    seal(document, checksum_key)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:
            file.write(json.dumps(document, indent=2) + "\n")
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def file_records(directory: Path, names) -> dict:
    """The `files` table: sha256 and size of each named file in directory."""
    return {name: {"sha256": sha256_file(directory / name), "bytes": (directory / name).stat().st_size}
            for name in names}


def read_sealed(path: Path, *, format: str, what: str, format_version: int, checksum_key: str,
                remedy: str) -> dict:
    """Read a sealed document, checking its format, its own checksum, then its version.

    The checksum comes before the version: a damaged version key is damage, not a
    newer format. what: the document's name in messages ("manifest"); remedy: what
    to do about damage, appended to the error messages."""
    try:
        document = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{path} is not valid JSON ({error}); {remedy}") from error
    if not isinstance(document, dict) or document.get("format") != format:
        raise ArtifactError(f"{path} is not a {format} {what}")
    if document.get(checksum_key) != sha256_bytes(_canonical(document, checksum_key)):
        raise ChecksumError(f"{path} was modified after it was written (its checksum does not match); {remedy}")
    version = document.get("format_version")
    if not isinstance(version, int) or version > format_version:
        raise ArtifactError(f"{path} has format version {version!r}; this clip-guard ({__version__}) reads "
                            f"up to {format_version}: upgrade clip-guard")
    return document


def verify_files(directory: Path, files: dict, owner: str, remedy: str) -> None:
    """Every file of a `files` table exists in directory and matches its sha256."""
    for name, record in files.items():
        file = directory / name
        if not file.is_file():
            raise ArtifactError(f"{file} is missing; {remedy}")
        if sha256_file(file) != record["sha256"]:
            raise ChecksumError(f"{file} does not match its sha256 in {owner}; the file is damaged or was "
                                f"replaced: {remedy}")
