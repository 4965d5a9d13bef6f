import os

import pytest

# keep TVM/onnxruntime from oversubscribing the 2-core CI machine
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder so default compiled/ output lands in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
