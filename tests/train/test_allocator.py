"""--keep-freed-memory: glibc keeps a freed block resident instead of returning it to the kernel. Each check
runs in a child process, since the setting is the whole process's for the rest of its life."""

import subprocess
import sys
import textwrap

import pytest

from ..conftest import python_m_pyfastpeft

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt (Linux)")

# 64 MiB malloc'ed, written, freed; the resident set before and after the free, without the setting and
# then with it
CHILD = textwrap.dedent(
    """
    import ctypes, ctypes.util
    from pyfastpeft.train.allocator import keep_freed_memory
    from pyfastpeft.train.progress import proc_status_bytes

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    size = 64 * 1024 * 1024

    def freed_mib():
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        resident = proc_status_bytes("VmRSS")
        libc.free(block)
        return (resident - proc_status_bytes("VmRSS")) / 2**20

    before = freed_mib()
    kept = keep_freed_memory()
    print(before, kept, freed_mib(), freed_mib())
    """
)


def test_a_freed_block_stays_resident():
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    before, kept, after, again = out.stdout.split()
    assert kept == "True"
    assert float(before) > 60  # glibc's default: the block was its own mapping, unmapped by free()
    assert abs(float(after)) < 4 and abs(float(again)) < 4, out.stdout  # kept: nothing handed back


def test_finetune_flag(tmp_path):
    flags = "finetune --model tiny --size small --steps 2 --keep-freed-memory".split()
    out = python_m_pyfastpeft(*flags, "--out", tmp_path / "run")
    assert out.returncode == 0, out.stderr[-2000:]
    assert (tmp_path / "run" / "summary.json").is_file()
