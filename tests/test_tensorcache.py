"""The on-disk tensor cache: a dropped entry is never seen as complete, even if the drop is cut short."""

import pytest
import torch

from aphq_cli import tensorcache
from aphq_cli.tensorcache import SharedUse, TensorCache


@pytest.mark.parametrize("entry", ["aph/a", ""])
def test_a_drop_cut_short_leaves_no_complete_entry(tmp_path, monkeypatch, entry):
    cache = TensorCache(tmp_path, key="k")
    for name in ("aph/a", "aph/b"):
        cache.fill(name, 2, lambda i: {"t": torch.full((3,), float(i))})
    assert cache.complete("aph/a", 2) and cache.complete("aph/b", 2)
    # A kill during the removal of the files: here, none of them removed.
    monkeypatch.setattr(tensorcache.shutil, "rmtree", lambda *a, **kw: None)
    cache.drop(entry)
    assert not cache.complete("aph/a", 2)
    assert cache.complete("aph/b", 2) == (entry != "")


def test_an_entry_another_reader_uses_is_not_dropped(tmp_path):
    """SharedUse: a run removes a shared cache's entry only when no other process (its own lock) reads it."""
    cache = TensorCache(tmp_path / "aph" / "k")
    cache.put("a", 0, {"aph": torch.ones(2)})
    cache.finish("a", 1)
    with SharedUse(cache) as mine:
        with SharedUse(cache):  # another reader: a lock of its own, as another run's stage holds
            assert not mine.drop("a") and cache.complete("a", 1)
        assert mine.drop("a") and not cache.complete("a", 1)
        assert not (tmp_path / "aph" / "k" / "a").exists()
    assert SharedUse(cache).drop("") and not cache.root.exists()  # not held: the drop only checks
