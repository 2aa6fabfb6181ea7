"""Tests for aphq_cli.artifacts: round trip, tamper detection, atomic writes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from aphq_cli import artifacts
from aphq_cli.artifacts import (
    FORMAT_VERSION,
    ArtifactHeader,
    atomic_write_text,
    describe_mismatch,
    is_current,
    load_artifact,
    read_header,
    remove_stale_temps,
    save_artifact,
    sha256_bytes,
    sha256_file,
    sha256_json,
)
from aphq_cli.errors import AphqError

REPO = Path(__file__).resolve().parents[1]
CKPT_A = "a" * 64
CKPT_B = "b" * 64
INPUTS = {"checkpoint": CKPT_A, "data": "d" * 64}


def _sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(3, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "i8": torch.randint(-128, 128, (4, 2), dtype=torch.int8, generator=g),
        "u8": torch.randint(0, 256, (9,), dtype=torch.uint8, generator=g),
        "i64": torch.tensor([-(2**62), 0, 2**62 + 5]),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
        # Non-contiguous input: must be saved as its logical values.
        "t": torch.arange(6, dtype=torch.float32).reshape(2, 3).t(),
    }


def _save(path: Path, tensors=None, **kw) -> Path:
    kw.setdefault("stage", "calibrate")
    kw.setdefault("config", {"bits": 4, "blocks": ["a", "b"]})
    kw.setdefault("inputs", INPUTS)
    return save_artifact(path, _sample_tensors() if tensors is None else tensors, **kw)


def _data_start(path: Path) -> int:
    """First 8 bytes are the little-endian header length N; data starts at 8+N."""
    (n,) = struct.unpack("<Q", path.read_bytes()[:8])
    return 8 + n


# 1. Round trip -------------------------------------------------------------


def test_round_trip_is_bit_identical(tmp_path):
    src = _sample_tensors()
    path = _save(tmp_path / "sub" / "c.safetensors", extra={"model": "swin-t"})
    got, header = load_artifact(path, stage="calibrate", expect_inputs=INPUTS)

    assert sorted(got) == sorted(src)
    for name, t in src.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        # Compare raw bytes, so -0.0 vs 0.0 or NaN payloads would also show.
        got_bytes = got[name].reshape(-1).view(torch.uint8).tolist()
        assert got_bytes == t.contiguous().reshape(-1).view(torch.uint8).tolist(), name
    assert got["t"].tolist() == [[0.0, 3.0], [1.0, 4.0], [2.0, 5.0]]
    assert got["i64"].tolist() == [-(2**62), 0, 2**62 + 5]

    assert header.stage == "calibrate"
    assert header.format_version == FORMAT_VERSION == 2
    assert header.config == {"bits": 4, "blocks": ["a", "b"]}
    assert header.inputs == INPUTS
    assert header.extra == {"model": "swin-t"}
    assert header == read_header(path)
    assert len(header.content_sha256) == 64
    assert header.created.endswith("+00:00")

    # The metadata is plain strings under aphq.* keys, readable by any tool.
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["aphq.stage"] == "calibrate"
    assert meta["aphq.format_version"] == "2"
    assert json.loads(meta["aphq.inputs"]) == INPUTS


def test_header_is_frozen(tmp_path):
    header = read_header(_save(tmp_path / "c.safetensors"))
    assert isinstance(header, ArtifactHeader)
    with pytest.raises(AttributeError):
        header.stage = "other"


# 2. Tamper detection -------------------------------------------------------


def test_flipped_data_byte_is_damaged(tmp_path):
    path = _save(tmp_path / "c.safetensors")
    raw = bytearray(path.read_bytes())
    start = _data_start(path)
    pos = start + (len(raw) - start) // 2
    raw[pos] ^= 0x01
    path.write_bytes(bytes(raw))
    # safetensors itself accepts the file; only our digest notices.
    load_file(str(path))
    with pytest.raises(AphqError, match="damaged"):
        load_artifact(path)


def test_truncated_file_is_not_readable(tmp_path):
    path = _save(tmp_path / "c.safetensors")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 10])
    with pytest.raises(AphqError, match="not a readable safetensors file") as ei:
        load_artifact(path)
    assert str(path) in str(ei.value)
    path.write_bytes(raw[:5])
    with pytest.raises(AphqError, match="not a readable"):
        read_header(path)


def test_random_file_is_not_readable(tmp_path):
    path = tmp_path / "junk.safetensors"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(AphqError, match="not a readable"):
        load_artifact(path)


def test_foreign_safetensors_is_refused(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.ones(2)}, str(path))
    with pytest.raises(AphqError, match="was not written by aphq"):
        read_header(path)


def test_other_format_version_is_refused(tmp_path):
    path = _save(tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    meta["aphq.format_version"] = "3"
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(AphqError, match="artifact format 3, this aphq reads 2"):
        load_artifact(path)
    assert not is_current(path, stage="calibrate", inputs=INPUTS)


def test_missing_file_and_wrong_stage(tmp_path):
    with pytest.raises(AphqError, match="does not exist"):
        load_artifact(tmp_path / "nope.safetensors")
    path = _save(tmp_path / "c.safetensors")
    with pytest.raises(AphqError, match="holds stage 'calibrate', expected 'reconstruct'"):
        load_artifact(path, stage="reconstruct")


# 3. Fingerprint mismatch ---------------------------------------------------


def test_changed_checkpoint_is_named(tmp_path):
    path = _save(tmp_path / "c.safetensors")
    now = dict(INPUTS, checkpoint=CKPT_B)
    with pytest.raises(AphqError) as ei:
        load_artifact(path, expect_inputs=now)
    msg = str(ei.value)
    assert "different checkpoint" in msg
    assert "aaaaaaaa…" in msg and "bbbbbbbb…" in msg
    assert "data" not in msg.replace(str(path), "")
    assert "--force" in msg
    header = read_header(path)
    assert describe_mismatch(header, now) == ["checkpoint"]
    assert describe_mismatch(header, INPUTS) == []
    assert describe_mismatch(header, {**INPUTS, "options": "o" * 64}) == ["options"]
    assert describe_mismatch(header, {"checkpoint": CKPT_A}) == ["data"]


def test_is_current(tmp_path):
    path = tmp_path / "c.safetensors"
    assert not is_current(path, stage="calibrate", inputs=INPUTS)
    _save(path)
    assert is_current(path, stage="calibrate", inputs=dict(INPUTS))
    assert not is_current(path, stage="calibrate", inputs=dict(INPUTS, checkpoint=CKPT_B))
    assert not is_current(path, stage="calibrate", inputs={"checkpoint": CKPT_A})
    assert not is_current(path, stage="reconstruct", inputs=INPUTS)
    path.write_bytes(path.read_bytes()[:20])
    assert not is_current(path, stage="calibrate", inputs=INPUTS)


# 4. Atomic write under SIGKILL ---------------------------------------------

_WRITER = textwrap.dedent(
    """
    import sys, torch
    from aphq_cli.artifacts import save_artifact
    path = sys.argv[1]
    print("ready", flush=True)
    i = 0
    while True:
        # 50 MB whose every value names the iteration, so a torn mix shows.
        t = torch.full((12_500_000,), float(i))
        save_artifact(path, {"w": t, "i": torch.tensor(i)}, stage="kill",
                      config={}, inputs={"i": str(i)})
        print(f"wrote {i}", flush=True)
        i += 1
    """
)


def test_sigkill_never_leaves_a_torn_file(tmp_path):
    delays = [0.05, 0.3, 0.7, 1.1, 1.5]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    # The children start together so their torch imports overlap.
    procs = []
    for k in range(len(delays)):
        target = tmp_path / f"w{k}" / "a.safetensors"
        proc = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(target)],
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        procs.append((proc, target))
    try:
        ready = []
        for proc, _ in procs:
            assert proc.stdout.readline().strip() == "ready"
            ready.append(time.monotonic())
        for k in sorted(range(len(delays)), key=lambda k: ready[k] + delays[k]):
            time.sleep(max(0.0, ready[k] + delays[k] - time.monotonic()))
            os.kill(procs[k][0].pid, signal.SIGKILL)
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()

    for proc, target in procs:
        assert proc.returncode == -signal.SIGKILL
        reported = [int(n) for n in proc.stdout.read().split()[1::2]]  # "wrote N"
        proc.stdout.close()
        if not target.exists():
            # Killed before its first write finished: at most a temp remains.
            assert reported == []
            remove_stale_temps(target.parent, min_age_s=0)
            assert not target.parent.exists() or list(target.parent.iterdir()) == []
            continue
        tensors, header = load_artifact(target, stage="kill")
        i = int(tensors["i"])
        # The file is the last reported write, or one more that finished
        # between os.replace and the print.
        last = reported[-1] if reported else -1
        assert i in (last, last + 1)
        assert header.inputs == {"i": str(i)}
        assert torch.equal(tensors["w"], torch.full((12_500_000,), float(i)))
        # A killed writer's temp file does not disturb readers and is swept.
        for p in remove_stale_temps(target.parent, min_age_s=0):
            assert p.name.startswith(".a.safetensors.") and ".tmp" in p.name
        assert [p.name for p in target.parent.iterdir()] == ["a.safetensors"]
    assert any(t.exists() for _, t in procs)


# 5. Full disk --------------------------------------------------------------


@pytest.mark.parametrize("fail_in", ["write", "fsync"])
def test_enospc_keeps_previous_artifact(tmp_path, monkeypatch, fail_in):
    path = _save(tmp_path / "c.safetensors", tensors={"w": torch.full((4,), 1.0)})

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(artifacts.os, fail_in, full_disk)
    with pytest.raises(AphqError) as ei:
        _save(path, tensors={"w": torch.full((4,), 2.0)})
    monkeypatch.undo()

    msg = str(ei.value)
    assert str(path) in msg and "No space left on device" in msg and "unchanged" in msg
    assert isinstance(ei.value.__cause__, OSError)
    tensors, _ = load_artifact(path)
    assert tensors["w"].tolist() == [1.0, 1.0, 1.0, 1.0]
    assert [p.name for p in tmp_path.iterdir()] == ["c.safetensors"]


# 6. Unwritable folder ------------------------------------------------------


def test_unwritable_folder(tmp_path):
    if os.geteuid() == 0:
        # Root ignores modes; a parent that is a regular file fails for anyone.
        blocker = tmp_path / "blocker"
        blocker.write_text("x")
        with pytest.raises(AphqError, match="blocker"):
            _save(blocker / "c.safetensors")
        return
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(AphqError, match="cannot write to folder .*ro"):
            _save(folder / "c.safetensors")
    finally:
        folder.chmod(0o700)


# 7. Fingerprints -----------------------------------------------------------


def test_sha256_json_is_canonical():
    a = {"b": [1, 2, {"y": 1, "x": "é"}], "a": 1.5}
    b = {"a": 1.5, "b": [1, 2, {"x": "é", "y": 1}]}
    assert sha256_json(a) == sha256_json(b)
    expected = '{"a":1.5,"b":[1,2,{"x":"\\u00e9","y":1}]}'
    assert sha256_json(a) == hashlib.sha256(expected.encode()).hexdigest()
    assert sha256_json(a) != sha256_json({**a, "a": 2})
    assert sha256_bytes(b"abc") == hashlib.sha256(b"abc").hexdigest()


def test_sha256_file_matches_hashlib_and_tracks_changes(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pth"
    data = os.urandom(3 * (1 << 20) + 17)  # spans several read chunks
    path.write_bytes(data)
    first = sha256_file(path)
    assert first == hashlib.sha256(data).hexdigest()

    # A second call with the same (path, size, mtime) must not reread the file.
    def no_read(*args, **kwargs):
        raise AssertionError("file was reread")

    monkeypatch.setattr(artifacts, "open", no_read, raising=False)
    assert sha256_file(str(path)) == first
    monkeypatch.undo()

    # Same size, new bytes: the new mtime changes the memo key.
    changed = bytes([data[0] ^ 0xFF]) + data[1:]
    path.write_bytes(changed)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert sha256_file(path) == hashlib.sha256(changed).hexdigest() != first

    path.write_bytes(data[:100])
    assert sha256_file(path) == hashlib.sha256(data[:100]).hexdigest()

    with pytest.raises(AphqError, match="does not exist"):
        sha256_file(tmp_path / "missing.pth")


def test_atomic_write_text_replaces(tmp_path):
    path = tmp_path / "out" / "results.json"
    atomic_write_text(path, '{"map": 0.41}')
    atomic_write_text(path, '{"map": 0.42}')
    assert json.loads(path.read_text()) == {"map": 0.42}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]


def test_remove_stale_temps_keeps_other_files(tmp_path):
    keep = [tmp_path / "a.safetensors", tmp_path / ".hidden", tmp_path / "x.tmp"]
    for p in keep:
        p.write_text("k")
    stale = tmp_path / ".a.safetensors.123.0123abcd.tmp"
    stale.write_text("s")
    assert remove_stale_temps(tmp_path) == []  # too fresh: a writer may own it
    assert remove_stale_temps(tmp_path, min_age_s=0) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in keep)


@pytest.mark.parametrize("key, value", [("aphq.config", '{"bits":3,"blocks":["a","b"]}'),
                                        ("aphq.inputs", '{"checkpoint":"0000","data":"1111"}'),
                                        ("aphq.stage", "reconstruct"), ("aphq.extra", '{"model":"swin-s"}')])
def test_an_edited_header_is_damaged(tmp_path, key, value):
    """The header digest covers every field that says what the artifact means."""
    path = _save(tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta[key] != value
    save_file(load_file(str(path)), str(path), metadata=dict(meta, **{key: value}))
    for read in (read_header, load_artifact):
        with pytest.raises(AphqError, match="is damaged: its header does not match the digest"):
            read(path)
    assert not is_current(path, stage="calibrate", inputs=INPUTS)


def test_the_write_time_is_not_part_of_the_meaning(tmp_path):
    path = _save(tmp_path / "c.safetensors")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata=dict(meta, **{"aphq.created": "2020-01-01T00:00:00+00:00"}))
    assert read_header(path).created.startswith("2020")


def _interrupt_after_open(monkeypatch):
    """os.open that creates the temp file and is then interrupted (a signal right after the syscall)."""
    import aphq_cli.artifacts as artifacts

    real_open = os.open

    def open_then_interrupt(*args, **kwargs):
        os.close(real_open(*args, **kwargs))
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts.os, "open", open_then_interrupt)


def test_an_interrupt_right_after_the_temp_is_created_leaves_no_temp(tmp_path, monkeypatch):
    from aphq_cli.artifacts import atomic_write_text

    (tmp_path / "DONE").write_text("old")
    _interrupt_after_open(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(tmp_path / "DONE", "new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DONE"]
    assert (tmp_path / "DONE").read_text() == "old"

