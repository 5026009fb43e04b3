"""Peak memory of a process tree, read from /proc, on real processes."""

import os
import subprocess
import sys
import time

import pytest

from bench.memory import peak_rss_mib, process_tree_peaks

pytestmark = pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads /proc (Linux)")

HOLDS_MEMORY = "import time; block = bytearray(64 * 2**20); block[::4096] = b'x' * len(block[::4096]); time.sleep(60)"


def test_the_tree_holds_the_root_and_its_children_with_their_peaks():
    child = subprocess.Popen([sys.executable, "-c", HOLDS_MEMORY])
    try:
        deadline = time.monotonic() + 30
        while (peak_rss_mib(child.pid) or 0) < 64 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = process_tree_peaks(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert tree[0]["pid"] == os.getpid()
    found = {p["pid"]: p for p in tree}
    assert child.pid in found
    assert found[child.pid]["peak_rss_mib"] >= 64  # the 64 MiB it touched
    assert "python" in found[child.pid]["name"]


def test_a_gone_process_has_no_peak():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert peak_rss_mib(child.pid) is None
    assert process_tree_peaks(child.pid) == []
