"""The disk planner's pure functions: file sizes byte for byte, the unit cache's peak, the free-space check."""

import json

import pytest
import torch
from safetensors.torch import save

from aphq_cli.diskplan import (CachePlan, HeadPlan, aph_plan, check_free_space, done_marker_bytes, entry_bytes, joint_plan,
                               peak_of, reconstruct_plan, safetensors_bytes, unit_cache_entries)
from aphq_cli.errors import AphqError


@pytest.mark.parametrize("dtype, itemsize", [(torch.float32, 4), (torch.float16, 2)])
def test_file_size_is_what_safetensors_writes(dtype, itemsize):
    gen = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(1, 12, (), generator=gen))
        shapes = {f"t{i}": tuple(int(d) for d in torch.randint(1, 40, (int(torch.randint(1, 5, (), generator=gen)),),
                                                                 generator=gen)) for i in range(n)}
        written = save({k: torch.zeros(s, dtype=dtype) for k, s in shapes.items()})
        assert len(written) == safetensors_bytes(shapes, itemsize)


def test_done_marker_is_the_json_tensorcache_writes():
    assert done_marker_bytes(256, "ab" * 32) == len(json.dumps({"count": 256, "key": "ab" * 32}))
    # Images of other sizes make files of other sizes: each is counted as it is.
    assert entry_bytes([{"t0": (1, 2)}, {"t0": (1, 3)}], 4, "") == (
        safetensors_bytes({"t0": (1, 2)}, 4) + safetensors_bytes({"t0": (1, 3)}, 4) + done_marker_bytes(2, ""))


def _io(units):
    """One image where unit k outputs k + 1 elements, so every entry's size tells which unit made it."""
    io = {name: {"in": [(1, k)], "out": [(1, k + 1)]} for k, name in enumerate(units)}
    io["neck"] = {"in": [(1, 100), (1, 50)], "out": [(1, 200)]}
    return [io]


def test_the_necks_target_is_never_cached():
    units = ["a", "neck"]
    assert "y/1" not in [e for op, e, _ in unit_cache_entries(units, _io(units), "", "aph") if op == "fill"]
    assert "y/1" not in [e for op, e, _ in unit_cache_entries(units, _io(units), "", "aph", heads=HeadPlan(7, [11]))
                         if op == "fill"]


def test_unit_cache_drops_each_entry_once_nothing_reads_it():
    units = ["a", "b", "c", "neck"]
    ops = unit_cache_entries(units, _io(units), "", "aph")
    fills = [e for op, e, _ in ops if op == "fill"]
    assert fills == ["y/0", "q/1", "y/1", "q/2", "y/2", "fp/3", "q/3"]
    drops = [e for op, e, _ in ops if op == "drop"]
    # q/0 never exists (unit 0 reads the image): dropping it is a no-op.
    assert drops == ["q/0", "y/0", "q/1", "y/1", "q/2", "y/2"]
    sizes = {e: s for op, e, s in ops if op == "fill"}
    held, peaks = {}, []
    for op, entry, size in ops:
        if op == "fill":
            held[entry] = size
        elif op == "drop":
            held.pop(entry, None)
        else:
            peaks.append(sorted(held))
    # Each backbone unit trains with its quantized input, float input and target; the neck with its two
    # inputs (its target is computed from the float one).
    assert peaks == [["y/0"], ["q/1", "y/0", "y/1"], ["q/2", "y/1", "y/2"], ["fp/3", "q/3"]]
    # Between the peaks, c's quantized input is written while b's still is on disk: also three entries.
    moments = [["q/1", "y/0", "y/1"], ["q/1", "q/2", "y/1"], ["q/2", "y/1", "y/2"], ["fp/3", "q/3"]]
    assert peak_of(ops) == max(sum(sizes[e] for e in moment) for moment in moments)


def test_head_units_follow_the_neck_with_its_inputs_and_the_records():
    """The heads make the FPN outputs from the neck's inputs, which stay; the first head makes the float
    records; each head trains with its own target, then drops it."""
    units = ["a", "neck"]
    ops = unit_cache_entries(units, _io(units), "", "aph", heads=HeadPlan(7, [11, 13]))
    tail = ops[[op for op, _, _ in ops].index("peak", 2) + 1:]  # after the neck trains
    assert [(op, e, size) for op, e, size in tail] == [
        ("fill", "rec", 7), ("fill", "y/2", 11), ("peak", "", 0), ("drop", "y/2", 0),
        ("fill", "y/3", 13), ("peak", "", 0), ("drop", "y/3", 0)]
    sizes = {e: s for op, e, s in ops if op == "fill"}
    assert peak_of(ops) == sizes["fp/1"] + sizes["q/1"] + 7 + 13


def test_labels_and_flags_are_sized_as_stored():
    shapes = {"rois": (9, 5), "labels": (9,), "keep": (9,)}
    dtypes = {"labels": torch.int64, "keep": torch.bool}
    written = save({"rois": torch.zeros(9, 5), "labels": torch.zeros(9, dtype=torch.int64),
                    "keep": torch.zeros(9, dtype=torch.bool)})
    assert len(written) == safetensors_bytes(shapes, 4, dtypes)

def test_fisher_weights_stay_to_the_end():
    units = ["a", "b", "neck"]
    ops = unit_cache_entries(units, _io(units), "", "fisher")
    assert [e for op, e, _ in ops if op == "fill" and e.startswith("fisher")] == ["fisher/0", "fisher/1"]
    assert not [e for op, e, _ in ops if op == "drop" and e.startswith("fisher")]


def test_complete_entries_count_as_written(tmp_path):
    units = ["a", "neck"]
    whole = reconstruct_plan(tmp_path, units, _io(units) * 4, "k", "mse")
    resumed = reconstruct_plan(tmp_path, units, _io(units) * 4, "k", "mse", {"y/0": whole.entries["y/0"]})
    assert resumed.peak == whole.peak and resumed.to_write == whole.peak - whole.entries["y/0"]
    assert reconstruct_plan(tmp_path, units, _io(units) * 4, "k", "none").peak == 0


def test_free_space_check_adds_caches_on_one_filesystem(tmp_path):
    a = CachePlan(str(tmp_path / "run" / "cache"), 600)
    b = CachePlan(str(tmp_path / "aph"), 500, written=100)
    check_free_space("reconstruct", [("unit cache", a), ("APH cache", b)], free=lambda p: 1000)
    with pytest.raises(AphqError, match=r"^reconstruct would write 0.00 GiB to the unit cache .* and the APH cache "
                                        r".* but only 0.00 GiB is free there; free some space"):
        check_free_space("reconstruct", [("unit cache", a), ("APH cache", b)], free=lambda p: 999)
    assert not (tmp_path / "run").exists()  # a folder not made yet is checked on its nearest existing parent


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_entry_is_what_the_tensor_cache_writes_in_its_dtype(tmp_path, dtype):
    from aphq_cli.tensorcache import TensorCache

    cache = TensorCache(tmp_path, dtype=dtype, key="k" * 16)
    shapes = [{"t0": (1, 7, 9, 32), "t1": (1, 3)}, {"t0": (1, 5, 9, 32), "t1": (1, 3)}]  # images of two sizes
    cache.fill("y/0", 2, lambda i: {k: torch.randn(s) for k, s in shapes[i].items()})
    written = sum(f.stat().st_size for f in (tmp_path / "y/0").iterdir())
    assert written == entry_bytes(shapes, dtype.itemsize, "k" * 16)


def test_a_float16_unit_cache_is_planned_at_half_the_data():
    units = ["a", "b", "neck"]
    ios = [{name: {"in": [(1, 1000)], "out": [(1, 1000)]} for name in units}]
    full, half = (reconstruct_plan("/tmp", units, ios, "k", "aph", itemsize=n) for n in (4, 2))
    # 1000 values per entry: 2000 bytes fewer each; the headers ("F32" / "F16") are the same length.
    assert {e: full.entries[e] - half.entries[e] for e in full.entries} == {e: 2000 for e in full.entries}
    assert full.peak - half.peak == 2000 * 3  # unit b: its two inputs and its target


def test_the_joint_plan_drops_each_units_aph_maps_after_it(tmp_path):
    units = ["a", "b", "neck"]
    ios = [{"a": {"in": [(1, 10)], "out": [(1, 10)]}, "b": {"in": [(1, 10)], "out": [(1, 10)]},
            "neck": {"in": [(1, 10)], "out": [(1, 40)]}}]
    unit = reconstruct_plan(tmp_path, units, ios, "", "aph")
    aph = aph_plan(tmp_path / "aph", ["a", "b"], ios)
    kept = joint_plan(unit, aph, units, ios, "", "aph")
    dropped = joint_plan(unit, aph, units, ios, "", "aph", drop_aph=True)
    e, m = unit.entries, {k: aph.entries[k] for k in ("a", "b")}
    # Kept: b trains with both maps and its three entries; dropped: a's map is gone by then.
    assert kept.peak == m["a"] + m["b"] + e["q/1"] + e["y/0"] + e["y/1"]
    assert dropped.peak == m["b"] + e["q/1"] + e["y/0"] + e["y/1"]
    # One filesystem: the check uses the joint peak, not the sum of the two caches' peaks.
    need = unit.peak + aph.peak
    check_free_space("reconstruct", [("unit cache", unit), ("APH cache", aph)], free=lambda p: dropped.peak,
                     together=dropped)
    with pytest.raises(AphqError, match="would write"):
        check_free_space("reconstruct", [("unit cache", unit), ("APH cache", aph)], free=lambda p: need - 1)
