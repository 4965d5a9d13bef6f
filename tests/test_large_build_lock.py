"""The large-build lock (tests/conftest.py) keeps memory-heavy tests of different xdist
workers from running at once: while one process holds it, another cannot take it."""

import subprocess
import sys


def test_another_process_cannot_take_the_lock_while_a_test_holds_it(large_build_lock):
    path = large_build_lock.path
    probe = (
        "import fcntl, sys\n"
        f"f = open({str(path)!r}, 'a')\n"
        "try:\n"
        "    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "except BlockingIOError:\n"
        "    sys.exit(3)\n"
        "sys.exit(0)\n"
    )
    with large_build_lock():
        held = subprocess.run([sys.executable, "-c", probe]).returncode
    free = subprocess.run([sys.executable, "-c", probe]).returncode
    assert (held, free) == (3, 0), f"lock held: probe exit {held} (want 3); released: {free} (want 0)"
