"""On-disk caches of per-image tensors, so host memory does not grow with the image count.

One safetensors file per (entry, image): a stage writes an image's tensors
once and reads them back one image at a time during its iterations. Files are
written atomically, so a killed writer never leaves a torn entry; an entry is
complete when its ``DONE`` marker exists and names the cache's key: the
fingerprint of every input and setting its tensors follow from. An entry left
by a run with other settings (an earlier, killed run in the same folder) is
therefore never taken as complete: it is filled again.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from aphq_cli import distributed
from aphq_cli.artifacts import atomic_write_bytes, atomic_write_text


class TensorCache:
    """A folder of ``<entry>/<index>.safetensors`` files.

    Args:
        root: the cache folder.
        dtype: floating tensors are stored in this dtype (float16 halves the
            disk for APH weights) and read back as float32.
        key: what the entries are made from (a digest of the stage's inputs and
            settings); an entry finished under another key is incomplete.
    """

    def __init__(self, root: Path, dtype: torch.dtype = torch.float32, key: str = "") -> None:
        self.root = Path(root)
        self.dtype = dtype
        self.key = key

    def _file(self, entry: str, index: int) -> Path:
        return self.root / entry / f"{index:06d}.safetensors"

    def put(self, entry: str, index: int, tensors: dict[str, torch.Tensor]) -> None:
        stored = {k: (v.detach().to("cpu", self.dtype) if v.is_floating_point() else v.detach().cpu()).contiguous()
                  for k, v in tensors.items()}
        atomic_write_bytes(self._file(entry, index), save(stored))

    def get(self, entry: str, index: int, device="cpu") -> dict[str, torch.Tensor]:
        tensors = load_file(str(self._file(entry, index)))
        return {k: (v.float() if v.is_floating_point() else v).to(device) for k, v in tensors.items()}

    def complete(self, entry: str, count: int) -> bool:
        """True when ``entry`` was finished with ``count`` items under this cache's key."""
        marker = self.root / entry / "DONE"
        try:
            done = json.loads(marker.read_text())
        except (OSError, ValueError):  # absent, or not ours: fill it again
            return False
        return isinstance(done, dict) and done.get("count") == count and done.get("key", "") == self.key

    def finish(self, entry: str, count: int) -> None:
        atomic_write_text(self.root / entry / "DONE", json.dumps({"count": count, "key": self.key}))

    def fill(self, entry: str, count: int, fn, progress=None) -> None:
        """``self[entry][i] = fn(i)`` for every item, unless the entry is complete already.

        Under torchrun each rank computes its share (items rank, rank+K, ...)
        into the shared folder; rank 0 marks the entry complete once every
        rank is done, and the trailing barrier lets all ranks see the marker.

        Args:
            fn: ``index -> {name: tensor}``.
            progress: optional callable ``(done, total)`` over this rank's share.
        """
        if self.complete(entry, count):
            return
        mine = distributed.my_indices(count)
        for done, i in enumerate(mine, 1):
            self.put(entry, i, fn(i))
            if progress is not None:
                progress(done, len(mine))
        distributed.barrier()
        if distributed.is_main():
            self.finish(entry, count)
        distributed.barrier()

    def drop(self, entry: str) -> None:
        """Remove an entry (``""``: the whole cache); its marker first, so a drop cut short is never complete."""
        for marker in ([self.root / entry / "DONE"] if entry else sorted(self.root.glob("**/DONE"))):
            marker.unlink(missing_ok=True)
        shutil.rmtree(self.root / entry, ignore_errors=True)


class SharedUse:
    """A context in which this process reads ``cache``, which other processes (runs) may read too.

    While it is held, a shared ``flock`` on a file beside the cache folder (not
    in it: dropping the whole cache removes the folder) tells other processes
    the cache is in use, and :meth:`drop` removes an entry only when no other
    process holds one: a run never deletes what another run is reading. A
    reader that starts during a drop waits for it to end, then finds the entry
    incomplete and fills it again. The OS releases the lock when a process
    dies. Under torchrun rank 0 holds it for the job (the other ranks read
    between the same barriers), so only rank 0 drops.
    """

    def __init__(self, cache: TensorCache) -> None:
        self.cache = cache
        self.lock = cache.root.parent / f".{cache.root.name}.users"
        self._fd: int | None = None

    def __enter__(self) -> "SharedUse":
        if distributed.is_main():
            self._fd = self._open()
            fcntl.flock(self._fd, fcntl.LOCK_SH)
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None

    def _open(self) -> int:
        self.lock.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)

    def drop(self, entry: str) -> bool:
        """Remove ``entry`` (``""``: the whole cache) unless another process uses the cache; whether it did."""
        fd = self._fd if self._fd is not None else self._open()
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held by this process alone
            except BlockingIOError:
                return False
            self.cache.drop(entry)
            return True
        finally:
            if fd == self._fd:
                fcntl.flock(fd, fcntl.LOCK_SH)  # back to reading
            else:
                os.close(fd)
