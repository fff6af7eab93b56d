"""The bytes of uploaded files, one file per id in a directory; the rows about them are in ember.store.db.

A file is written under a temporary name, fsynced, renamed into place and the directory fsynced, so a
file whose upload was acknowledged is whole on disk, and a crash mid-upload leaves only a temp file
(removed at the next start).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path
from typing import BinaryIO

TMP_PREFIX = ".upload-"
CHUNK = 1 << 20


class FileTooLarge(Exception):
    pass


class FileStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(TMP_PREFIX + "*"):  # uploads a crash interrupted
            stale.unlink(missing_ok=True)

    def path(self, file_id: str) -> Path:
        if not file_id.replace("-", "").isalnum():  # ids are ours: file-<hex>; never a path
            raise KeyError(file_id)
        return self.root / file_id

    def write(self, file_id: str, source: BinaryIO, limit: int) -> tuple[int, str]:
        """Copy `source` to the file of `file_id` durably: (size, sha256). FileTooLarge past `limit`."""
        tmp = self.root / f"{TMP_PREFIX}{file_id}"
        digest, size = hashlib.sha256(), 0
        try:
            with open(tmp, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if size > limit:
                        raise FileTooLarge(size)
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path(file_id))
        finally:
            tmp.unlink(missing_ok=True)
        self._sync_dir()
        return size, digest.hexdigest()

    def copy_to(self, file_id: str, dest: str | Path) -> None:
        shutil.copyfile(self.path(file_id), dest)

    def remove(self, file_id: str) -> None:
        self.path(file_id).unlink(missing_ok=True)
        self._sync_dir()

    def _sync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
