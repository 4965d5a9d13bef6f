"""Build folders that appear whole or not at all.

A build writes into a hidden temporary folder beside its destination and renames it into
place only when the build and its checks succeeded; on any error the temporary folder is
removed, so compiled/ never holds a half-written artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class StagedDir:
    """``with StagedDir(dest) as tmp: ...write into tmp...; stage.commit()``."""

    def __init__(self, dest: str | Path):
        self.dest = Path(dest).resolve()
        self.tmp: Path | None = None
        self.committed = False

    def __enter__(self) -> "StagedDir":
        self.dest.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.tmp-", dir=self.dest.parent))
        return self

    def path(self, name: str) -> Path:
        assert self.tmp is not None
        return self.tmp / name

    def commit(self) -> Path:
        assert self.tmp is not None
        old = None
        if self.dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{self.dest.name}.old-", dir=self.dest.parent))
            os.rename(self.dest, old / "previous")
        os.chmod(self.tmp, 0o755)  # mkdtemp makes it private; a published build is an ordinary folder
        os.rename(self.tmp, self.dest)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self.committed = True
        return self.dest

    def __exit__(self, exc_type, exc, tb) -> None:
        if not self.committed and self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


def write_json(path: str | Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def file_record(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}
