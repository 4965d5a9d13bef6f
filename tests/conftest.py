import os

import pytest

# keep TVM/onnxruntime from oversubscribing the 2-core CI machine
os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder so default compiled/ output lands in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(autouse=True)
def memory_returned():
    """After every test: the garbage collected and glibc's free memory handed back, so a
    worker's footprint does not grow test after test (one kept 7.2 GB after its builds). Not
    enough on its own at stop 18: one test near the run's end still reached 12.8 GB and the
    24 GB CI machine ran out of memory; that test is not yet found."""
    yield
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
