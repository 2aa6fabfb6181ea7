"""The artifact store: safetensors files that record what made them.

Every pipeline stage writes one artifact. Its safetensors header metadata holds
the stage name, a format version, the stage config as JSON, a sha256
fingerprint of each input, a digest of the tensor payload, and a digest of
all of those together. Readers check the header (``safe_open(...).metadata()``)
and its digest before loading any tensor, so a stale, foreign or edited file
is refused cheaply (an edited ``w_bits`` would otherwise describe another
model), and verify the payload digest after loading, because safetensors
itself does not detect flipped bytes in tensor data.

Writes are atomic: bytes go to a temporary file in the target's folder, are
fsynced, and are renamed over the target, so a killed writer leaves the old
artifact or none, never a torn one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from safetensors.torch import save as _st_save

from aphq_cli.errors import AphqError

# 2: the header digest (aphq.header_sha256) covers stage, format, config, inputs, extra and the payload digest.
FORMAT_VERSION = 2

_PREFIX = "aphq."
_KEY_STAGE = _PREFIX + "stage"
_KEY_FORMAT = _PREFIX + "format_version"
_KEY_CONFIG = _PREFIX + "config"
_KEY_INPUTS = _PREFIX + "inputs"
_KEY_EXTRA = _PREFIX + "extra"
_KEY_CONTENT = _PREFIX + "content_sha256"
_KEY_CREATED = _PREFIX + "created"
_KEY_HEADER = _PREFIX + "header_sha256"
# What the header digest covers: everything that says what the artifact means (not the write time).
_DIGESTED = (_KEY_STAGE, _KEY_FORMAT, _KEY_CONFIG, _KEY_INPUTS, _KEY_EXTRA, _KEY_CONTENT)

_CHUNK = 1 << 20
# Short enough to keep messages on one line, long enough to tell digests apart.
_SHORT = 8
# Temp names are ".<target name>.<pid>.<8 hex>.tmp"; the pattern is strict so
# that remove_stale_temps never touches files it did not make.
_TEMP_RE = re.compile(r"^\..+\.\d+\.[0-9a-f]{8}\.tmp$")

# (resolved path, size, mtime_ns) -> hex digest. Checkpoints are hundreds of
# MB and are fingerprinted by every stage; the key changes whenever the file
# is rewritten, so a stale digest is never returned.
_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


# --------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------


def sha256_bytes(data: bytes) -> str:
    """Returns the hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def canonical_json(obj: Any) -> str:
    """Serializes ``obj`` so that equal values give equal text.

    Args:
        obj: A JSON-serializable value.

    Returns:
        JSON with sorted keys, no whitespace and ASCII-only characters.
    """
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_json(obj: Any) -> str:
    """Returns the hex sha256 of the canonical JSON form of ``obj``."""
    return sha256_bytes(canonical_json(obj).encode("ascii"))


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Returns the hex sha256 of a file's bytes, memoized in-process.

    Args:
        path: The file to fingerprint.

    Returns:
        The hex digest.

    Raises:
        AphqError: If the file does not exist or cannot be read.
    """
    p = Path(path)
    try:
        resolved = p.resolve()
        st = resolved.stat()
    except FileNotFoundError as e:
        raise AphqError(f"{p} does not exist") from e
    except OSError as e:
        raise AphqError(f"could not read {p}: {e.strerror}") from e
    key = (str(resolved), st.st_size, st.st_mtime_ns)
    cached = _FILE_DIGESTS.get(key)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    try:
        with open(resolved, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except IsADirectoryError as e:
        raise AphqError(f"{p} is a folder, not a file") from e
    except OSError as e:
        raise AphqError(f"could not read {p}: {e.strerror}") from e
    digest = h.hexdigest()
    _FILE_DIGESTS[key] = digest
    return digest


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """Digests every tensor's name, dtype, shape and bytes in name order.

    Each record is framed by a JSON line that includes the byte count, so two
    different tensor sets can never produce the same byte stream.

    Args:
        tensors: Contiguous CPU tensors by name.

    Returns:
        The hex digest.
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        # A flat uint8 view reads the raw bytes of any dtype (bfloat16 and
        # bool included) without a copy; reshape(-1) also handles 0-d tensors.
        raw = t.reshape(-1).view(torch.uint8).numpy()
        frame = canonical_json(
            {"name": name, "dtype": str(t.dtype), "shape": list(t.shape), "nbytes": raw.nbytes}
        )
        h.update(frame.encode("ascii") + b"\n")
        h.update(raw)
    return h.hexdigest()


# --------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------


def _ensure_folder(folder: Path) -> None:
    """Creates ``folder`` (and parents) or says why it cannot be used."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:
        raise AphqError(f"cannot create folder {folder}: a file with that name exists") from e
    except OSError as e:
        raise AphqError(f"cannot create folder {folder}: {e.strerror}") from e


def _temp_path(target: Path) -> Path:
    """Names a temporary sibling of ``target`` that readers never open."""
    return target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _write_all(fd: int, data: bytes) -> None:
    """Writes all of ``data`` to ``fd``; os.write may write only part."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_folder(folder: Path) -> None:
    """Makes the rename durable by syncing the folder entry."""
    # Some filesystems refuse fsync on a folder. The rename has already
    # happened, so the target is complete either way; only durability across
    # a power cut is lost, which is not worth failing the stage for.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Replaces ``path`` with ``data`` so readers see the old file or the new.

    Args:
        path: The target file; its parent folder is created if needed.
        data: The full new content.

    Returns:
        The target path.

    Raises:
        AphqError: If the folder cannot be created or written, or the write
            fails (for example a full disk); the previous file is unchanged
            and no temporary file is left behind.
    """
    target = Path(path)
    folder = target.parent
    _ensure_folder(folder)
    # What a killed earlier writer of this same file left: the new write replaces it anyway.
    remove_stale_temps(folder, min_age_s=0, target=target.name)
    tmp = _temp_path(target)
    # The create is inside the cleanup's try: an interrupt (Ctrl-C, SIGTERM) can land on any
    # bytecode, including the one right after os.open made the file.
    try:
        try:
            # O_EXCL: never clobber another writer's temp; 0o666 lets the umask
            # decide the final mode, as for any ordinary file.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except OSError as e:
            raise AphqError(f"cannot write to folder {folder}: {e.strerror}") from e
        try:
            _write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            reason = e.strerror or os.strerror(e.errno or errno.EIO)
            raise AphqError(
                f"could not write {target}: {reason}; the previous file, if any, is unchanged"
            ) from e
        raise
    _fsync_folder(folder)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Replaces ``path`` with ``text`` atomically (see atomic_write_bytes).

    Args:
        path: The target file.
        text: The full new content.
        encoding: Text encoding.

    Returns:
        The target path.
    """
    return atomic_write_bytes(path, text.encode(encoding))


def process_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but belongs to someone else
        return True
    return True


def _writer_gone(temp: Path, min_age_s: float, now: float) -> bool:
    """A temp file's writer (the pid in its name) has died here, and the file is ``min_age_s`` old."""
    pid = int(temp.name.rsplit(".", 3)[1])
    try:
        age = now - temp.stat().st_mtime
    except FileNotFoundError:
        return False
    # The age guards a run folder on a file system shared with other machines, where a pid names
    # nothing here: their writers rewrite a temp's bytes long before a minute passes.
    return age >= min_age_s and not process_alive(pid)


def remove_stale_temps(folder: str | os.PathLike[str], *, min_age_s: float = 60.0,
                       recursive: bool = False, target: str | None = None) -> list[Path]:
    """Deletes temporary files left in ``folder`` by killed writers.

    A temp file is stale when the process named in it is gone and it has not
    been touched for ``min_age_s``: a running writer keeps its file.

    Args:
        folder: The artifact folder.
        min_age_s: Only temps untouched for this long are removed.
        recursive: Also sweep every folder below ``folder``.
        target: Only the temps of this file name (``a.safetensors``).

    Returns:
        The removed paths, sorted.
    """
    root = Path(folder)
    if not root.is_dir():
        return []
    now = time.time()
    removed = []
    walk = os.walk(root) if recursive else [(str(root), [], os.listdir(root))]
    for where, _, names in walk:
        for name in names:
            if not _TEMP_RE.match(name) or (target is not None and not name.startswith(f".{target}.")):
                continue
            p = Path(where) / name
            if _writer_gone(p, min_age_s, now):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return sorted(removed)


# --------------------------------------------------------------------------
# Artifacts
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ArtifactHeader:
    """What an artifact records about how it was made.

    Attributes:
        stage: Name of the stage that wrote it.
        format_version: Artifact format it was written with.
        config: The stage config, as saved.
        inputs: Input name -> sha256 fingerprint (checkpoint, data, ...).
        extra: Free-form string metadata added by the stage.
        content_sha256: Digest of the tensor payload (see tensors_sha256).
        created: ISO-8601 UTC time of writing; never compared.
    """

    stage: str
    format_version: int
    config: dict
    inputs: dict[str, str]
    extra: dict[str, str]
    content_sha256: str
    created: str


def _check_str_map(name: str, mapping: dict[str, str]) -> None:
    """Safetensors metadata is strings only; catch stage bugs at write time."""
    for k, v in mapping.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"{name} must map str to str, got {k!r}: {type(v).__name__}")


def _prepare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Moves tensors to CPU and makes them contiguous, as safetensors needs."""
    out = {}
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r} is a {type(t).__name__}, not a torch.Tensor")
        out[name] = t.detach().to("cpu").contiguous()
    return out


def save_artifact(
    path: str | os.PathLike[str],
    tensors: dict[str, torch.Tensor],
    *,
    stage: str,
    config: dict,
    inputs: dict[str, str],
    extra: dict[str, str] | None = None,
) -> Path:
    """Writes tensors and their provenance to a safetensors file, atomically.

    Args:
        path: The artifact file to write or replace.
        tensors: Tensors by name; any device, any layout.
        stage: Name of the stage writing it.
        config: The stage config (JSON-serializable).
        inputs: Input name -> sha256 fingerprint.
        extra: Optional free-form string metadata.

    Returns:
        The artifact path.

    Raises:
        AphqError: If the file cannot be written (see atomic_write_bytes).
    """
    extra = dict(extra or {})
    _check_str_map("inputs", inputs)
    _check_str_map("extra", extra)
    cpu = _prepare(tensors)
    metadata = {
        _KEY_STAGE: stage,
        _KEY_FORMAT: str(FORMAT_VERSION),
        _KEY_CONFIG: canonical_json(config),
        _KEY_INPUTS: canonical_json(inputs),
        _KEY_EXTRA: canonical_json(extra),
        _KEY_CONTENT: tensors_sha256(cpu),
        _KEY_CREATED: datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    metadata[_KEY_HEADER] = _header_digest(metadata)
    return atomic_write_bytes(path, _st_save(cpu, metadata=metadata))


def _header_digest(meta: dict[str, str]) -> str:
    """sha256 of the metadata fields that give the artifact its meaning, as stored."""
    return hashlib.sha256(canonical_json([meta.get(k, "") for k in _DIGESTED]).encode()).hexdigest()


def _unreadable(p: Path) -> AphqError:
    return AphqError(f"{p} is not a readable safetensors file (truncated or corrupt?)")


def _read_metadata(p: Path) -> dict[str, str] | None:
    """Reads only the safetensors header metadata of ``p``."""
    if not p.exists():
        raise AphqError(f"{p} does not exist")
    if p.is_dir():
        raise AphqError(f"{p} is a folder, not an artifact file")
    try:
        with safe_open(str(p), framework="pt") as f:
            return f.metadata()
    except PermissionError as e:
        raise AphqError(f"could not read {p}: {e.strerror}") from e
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(p) from e


def _parse_header(p: Path, meta: dict[str, str]) -> ArtifactHeader:
    """Builds the header from metadata whose format version already matched."""
    try:
        config = json.loads(meta[_KEY_CONFIG])
        inputs = json.loads(meta[_KEY_INPUTS])
        extra = json.loads(meta.get(_KEY_EXTRA, "{}"))
        content = meta[_KEY_CONTENT]
    except (KeyError, ValueError) as e:
        raise AphqError(f"{p} has a damaged aphq header; rerun the stage") from e
    return ArtifactHeader(
        stage=meta[_KEY_STAGE],
        format_version=FORMAT_VERSION,
        config=config,
        inputs=inputs,
        extra=extra,
        content_sha256=content,
        created=meta.get(_KEY_CREATED, ""),
    )


def read_header(path: str | os.PathLike[str]) -> ArtifactHeader:
    """Reads an artifact's header without loading any tensor.

    Args:
        path: The artifact file.

    Returns:
        The parsed header.

    Raises:
        AphqError: If the file is missing, not a readable safetensors file,
            not written by aphq, written with another format version, or its
            header differs from its header digest.
    """
    p = Path(path)
    meta = _read_metadata(p)
    if not meta or _KEY_STAGE not in meta or _KEY_FORMAT not in meta:
        raise AphqError(f"{p} was not written by aphq")
    try:
        version = int(meta[_KEY_FORMAT])
    except ValueError as e:
        raise AphqError(f"{p} has a damaged aphq header; rerun the stage") from e
    if version != FORMAT_VERSION:
        raise AphqError(
            f"{p} was written with artifact format {version}, this aphq reads "
            f"{FORMAT_VERSION}; rerun the stage"
        )
    if meta.get(_KEY_HEADER) != _header_digest(meta):
        raise AphqError(f"{p} is damaged: its header does not match the digest it was written with "
                        "(edited since?); rerun the stage")
    return _parse_header(p, meta)


def describe_mismatch(header: ArtifactHeader, expect_inputs: dict[str, str]) -> list[str]:
    """Names the inputs whose fingerprints differ from those recorded.

    Both directions count: an input expected but not recorded, and one
    recorded but no longer expected, both make the artifact stale.

    Args:
        header: The artifact's header.
        expect_inputs: Input name -> fingerprint as they are now.

    Returns:
        Sorted names of differing inputs; empty when all match.
    """
    names = set(header.inputs) | set(expect_inputs)
    return sorted(n for n in names if header.inputs.get(n) != expect_inputs.get(n))


def _short(digest: str) -> str:
    return digest[:_SHORT] + "…"


def _mismatch_phrase(name: str, old: str | None, new: str | None) -> str:
    if new is None:
        return f"a {name} input that is no longer expected (fingerprint {_short(old)})"
    if old is None:
        return f"no recorded {name} (now {_short(new)})"
    return f"a different {name} (fingerprint {_short(old)}, now {_short(new)})"


def _check_stage(p: Path, header: ArtifactHeader, stage: str | None) -> None:
    if stage is not None and header.stage != stage:
        raise AphqError(f"{p} holds stage {header.stage!r}, expected {stage!r}")


def _check_inputs(p: Path, header: ArtifactHeader, expect_inputs: dict[str, str] | None) -> None:
    if expect_inputs is None:
        return
    names = describe_mismatch(header, expect_inputs)
    if names:
        phrases = [_mismatch_phrase(n, header.inputs.get(n), expect_inputs.get(n)) for n in names]
        raise AphqError(
            f"{p} was made from {' and '.join(phrases)}; rerun the stage or pass --force"
        )


def load_artifact(
    path: str | os.PathLike[str],
    *,
    stage: str | None = None,
    expect_inputs: dict[str, str] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, torch.Tensor], ArtifactHeader]:
    """Loads an artifact after checking its header and payload digest.

    Args:
        path: The artifact file.
        stage: If given, the stage the artifact must come from.
        expect_inputs: If given, the input fingerprints it must record.
        device: Where to put the loaded tensors.

    Returns:
        The tensors by name, and the header.

    Raises:
        AphqError: If the header is unreadable or foreign (see read_header),
            the stage or inputs differ, or the tensor data is damaged.
    """
    p = Path(path)
    header = read_header(p)
    _check_stage(p, header, stage)
    _check_inputs(p, header, expect_inputs)
    try:
        # Load on CPU first: the digest is computed there, then moved once.
        tensors = load_file(str(p), device="cpu")
    except PermissionError as e:
        raise AphqError(f"could not read {p}: {e.strerror}") from e
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _unreadable(p) from e
    if tensors_sha256(tensors) != header.content_sha256:
        raise AphqError(
            f"{p} is damaged: its tensor data does not match the digest in its header"
        )
    if torch.device(device).type != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, header


def is_current(path: str | os.PathLike[str], *, stage: str, inputs: dict[str, str]) -> bool:
    """Says whether ``path`` is a cache hit for this stage and these inputs.

    Only the header is read, so this is cheap; damaged tensor data is caught
    later by load_artifact.

    Args:
        path: The artifact file.
        stage: The stage that should have written it.
        inputs: Input name -> fingerprint as they are now.

    Returns:
        True when the file exists, its header reads with this format, and its
        stage and inputs equal those given; False otherwise, never raising.
    """
    try:
        header = read_header(path)
    except AphqError:
        return False
    return header.stage == stage and header.inputs == inputs


def load_if_current(path: str | os.PathLike[str], *, stage: str, inputs: dict[str, str],
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor] | None:
    """The tensors of a finished part, or None when it has to be made (again).

    A resumable stage asks this of each part (block, unit) it finished on an
    earlier run. A part that is absent, was made from other inputs, or is
    damaged (an unreadable header, or tensor data that fails its digest)
    gives None, so the stage recomputes it and overwrites the file, instead
    of stopping every resume on it.

    Args:
        path: The part's artifact file.
        stage: The stage that should have written it.
        inputs: Input name -> fingerprint as they are now.
        device: Where to put the loaded tensors.
    """
    if not is_current(path, stage=stage, inputs=inputs):
        return None
    try:
        return load_artifact(path, stage=stage, expect_inputs=inputs, device=device)[0]
    except AphqError:
        return None
