import contextlib
import fcntl
import os

import pytest

# keep TVM/onnxruntime from oversubscribing the 2-core CI machine
os.environ.setdefault("OMP_NUM_THREADS", "2")
# tuning runs end with a check of the tuned kernels in the model (two builds, a few hundred
# runs); the tests that are about it turn it on, the others keep their tiny budgets tiny
os.environ.setdefault("GRAPHGEN_TUNE_IN_MODEL", "0")


def tiny_model():
    """The tuning tests' model, five or six kernels: conv3x3+bias+relu, max pool,
    conv1x1+bias+relu, global mean, (reshape), dense+bias."""
    from graphgen.builder import GraphBuilder

    b = GraphBuilder("tiny")
    x = b.input("input", (1, 3, 16, 16))
    x = b.relu(b.conv(x, 8, 3, padding=1, name="c1"))
    x = b.max_pool(x, 2, 2)
    x = b.relu(b.conv(x, 16, 1, name="c2"))
    x = b.linear(b.flatten(b.global_avg_pool(x)), 10, name="fc")
    b.output(x, "out")
    return b.build()


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    import onnx

    from graphgen.optimize import optimize

    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    onnx.save(optimize(tiny_model()).model, str(path))
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private user cache: the default tuning database of every test is in tmp."""
    monkeypatch.setenv("GRAPHGEN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in an empty folder so default compiled/ output lands in tmp."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "large_memory: holds the large-build lock for the whole test (see large_build_lock)"
    )


@pytest.fixture
def large_build_lock(tmp_path_factory):
    """A context manager that lets one test at a time, across all xdist workers, run a build
    that raises a worker's peak memory by up to 3 GB, to 12-13.5 GB (VGGs, FCNs). Two at once ran the 24 GB CI
    machine out of memory. xdist's ``--dist loadgroup`` was meant to keep them on one worker,
    but with pytest 9.2 it no longer groups anything (xdist 3.8 renames ``item._nodeid``, which
    pytest 9.2 no longer reads), so an OS file lock does it: it works with any scheduler. The
    lock file lives in the run's shared base folder (the parent of each worker's own); its
    path is ``large_build_lock.path``."""
    path = tmp_path_factory.getbasetemp().parent / "graphgen-large-builds.lock"

    @contextlib.contextmanager
    def hold():
        with open(path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    hold.path = path
    return hold


def _return_memory_to_the_os():
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.fixture(scope="module", autouse=True)
def module_caches_cleared(request):
    """After a test module's tests on this worker: every ``functools.lru_cache`` among the
    module's globals (its own or imported) is emptied. The recipe tests cache built graphs (several tests read one graph), and
    a worker that kept every module's graphs grew to 7-10 GB before the zoo builds started;
    with a 3-4 GB VGG build on top, two such workers ran the 24 GB CI machine out of memory
    (the kernel killed one; xdist then waited forever on the dead worker). A module whose tests
    come back later on the same worker just builds its graphs again."""
    yield
    for value in list(vars(request.module).values()):
        if callable(getattr(value, "cache_clear", None)) and hasattr(value, "cache_info"):
            value.cache_clear()
    _return_memory_to_the_os()


@pytest.fixture(autouse=True)
def memory_returned(request):
    """After every test: the garbage collected and glibc's free memory handed back, so a
    worker's footprint does not grow test after test (one kept 7.2 GB after its builds).
    Tests marked ``large_memory`` also hold the large-build lock from start to end."""
    with contextlib.ExitStack() as stack:
        if request.node.get_closest_marker("large_memory"):
            stack.enter_context(request.getfixturevalue("large_build_lock")())
        yield
    _return_memory_to_the_os()
