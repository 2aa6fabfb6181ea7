"""aphq_cli.allocator: freed memory stays in the heap for the next allocation, and the user can opt out.

Each case runs in a fresh interpreter: the setting is process-wide and glibc
reads its own MALLOC_* variables only when a process starts.
"""

import ctypes
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from aphq_cli.allocator import _glibc_malloc
from aphq_cli.artifacts import load_artifact
from stages.calibrate import calibrate
from tests.stages.conftest import FAST_CALIB

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or _glibc_malloc() is None
                                or not hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2"),
                                reason="glibc's malloc only, 2.33 or later (mallinfo2)")

# An 8 MiB block from malloc, then freed: whether glibc served it from a private mapping (hblks: mapped
# blocks in use; unmapped again on free, so the next one faults its pages in afresh), and how much of the
# heap it keeps once the block is freed (arena: bytes the heap holds from the system). Nothing may free a
# block that large before it, or glibc's dynamic mmap threshold would rise past it under the defaults too:
# the probe imports only aphq_cli.allocator, which allocates nothing of that size.
PROBE = """
import ctypes, json
from aphq_cli.allocator import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
set_ = retain_freed_memory()
before = libc.mallinfo2()
block = libc.malloc(8 << 20)
ctypes.memset(block, 1, 8 << 20)
during = libc.mallinfo2()
libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"set": set_, "mapped": during.hblks - before.hblks, "kept": after.arena - before.arena}))
"""

MIB = 1 << 20


def _clean_env() -> dict[str, str]:
    """This environment without any malloc tuning of its own."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith("MALLOC_") and k not in ("APHQ_MALLOC", "GLIBC_TUNABLES")}


def _probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env=_clean_env() | env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_stays_in_the_heap_for_the_next_allocation():
    retained = _probe()
    assert retained["set"] is True
    assert retained["mapped"] == 0  # from the heap, not a mapping of its own
    assert retained["kept"] >= 7 * MIB  # and the heap still holds it after the free (not trimmed)


def test_the_user_can_keep_glibc_defaults():
    """$APHQ_MALLOC=default, or glibc's own MALLOC_* variables, leave malloc alone: the block is a mapping."""
    for env in ({"APHQ_MALLOC": "default"}, {"APHQ_MALLOC": "off"}, {"MALLOC_TRIM_THRESHOLD_": str(128 * 1024)},
                {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}):
        left = _probe(**env)
        assert left["set"] is False
        assert left["mapped"] == 1 and left["kept"] < MIB, env


def test_a_reconstruction_is_the_same_to_the_bit_with_freed_memory_kept(tmp_path, synth_dir, random_tiny_checkpoint):
    """Reused memory is not zeroed as a fresh page is: a read of memory no one wrote would show here."""
    calibrate(model="tiny-mask-rcnn", run=tmp_path / "default", checkpoint=random_tiny_checkpoint, data=synth_dir,
              calib_images=1, settings=FAST_CALIB)
    shutil.copytree(tmp_path / "default", tmp_path / "retained")
    tensors = {}
    # The retained run checks that the setting took: else this test would pass with the feature broken.
    command = {"default": ["-m", "aphq_cli"],
               "retained": ["-c", "from aphq_cli.allocator import retain_freed_memory as retain; assert retain(); "
                                  "from aphq_cli.cli import main; main()"]}
    for malloc in ("default", "retained"):
        env = _clean_env() | {"APHQ_CACHE": str(tmp_path / f"cache-{malloc}")}
        if malloc == "default":
            env["APHQ_MALLOC"] = "default"
        run = tmp_path / malloc
        done = subprocess.run([sys.executable, *command[malloc], "reconstruct", "--run", str(run), "--loss", "mse",
                               "--iters", "4", "--images", "2"], env=env, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr
        tensors[malloc] = load_artifact(run / "reconstruct.safetensors")[0]
    assert tensors["default"].keys() == tensors["retained"].keys()
    assert all(torch.equal(v, tensors["retained"][k]) for k, v in tensors["default"].items())
