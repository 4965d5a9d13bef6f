"""The conftest's module_caches_cleared fixture, run in a pytest session of its own."""
import shutil
import subprocess
import sys
from pathlib import Path

CACHING_MODULE = '''
import functools

@functools.lru_cache(maxsize=None)
def graph(n):
    return [0] * n

def test_fills_the_cache():
    graph(3)
    assert graph.cache_info().currsize == 1
'''

LATER_MODULE = '''
import test_a_caches

def test_the_first_modules_cache_is_empty_once_its_tests_ended():
    assert test_a_caches.graph.cache_info().currsize == 0
'''


def test_a_modules_lru_caches_are_empty_after_its_tests(tmp_path):
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "test_a_caches.py").write_text(CACHING_MODULE)
    (tmp_path / "test_b_reads.py").write_text(LATER_MODULE)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist", str(tmp_path)],
                       cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 passed" in r.stdout
