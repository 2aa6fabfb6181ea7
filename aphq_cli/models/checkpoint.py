"""Reading, converting and strictly loading detector checkpoints.

Two file formats (``.pth`` as mmdetection saves it, with ``state_dict`` and
``meta``; ``.safetensors``) and two backbone layouts: the published
Swin-Transformer-Object-Detection layout, which our backbone uses, and
mmdetection 2.28's own ``SwinTransformer`` layout, converted on load.
"""

from __future__ import annotations

import io
import pickle
import re
from pathlib import Path
from typing import Literal, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from aphq_cli.artifacts import atomic_write_bytes
from aphq_cli.errors import AphqError

Layout = Literal["original", "mmdet"]
StateDict = dict[str, torch.Tensor]

_SHOW = 5  # keys listed in an error message
# How torch's weights-only unpickler names an object it will not create.
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")


def read_state_dict(path: Path, *, trust_pickle: bool = False) -> StateDict:
    """Read the tensors of a checkpoint file, without any model.

    Args:
        path: ``.safetensors`` or a torch pickle (``.pth``, ``.pt``, ``.bin``).
        trust_pickle: allow arbitrary objects in a pickle. Only for files from
            a trusted source: unpickling can run code.

    Returns:
        Parameter name -> tensor, unwrapped from ``state_dict``/``model`` and
        without a ``module.`` prefix left by DataParallel.
    """
    path = Path(path)
    if not path.is_file():
        raise AphqError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        try:
            obj = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise AphqError(f"checkpoint {path} is not a readable safetensors file ({err})") from err
    else:
        obj = _torch_load(path, trust_pickle)
    return _unwrap(obj, path)


def _torch_load(path: Path, trust_pickle: bool) -> object:
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as err:
        found = _REFUSED_GLOBAL.search(str(err))
        if trust_pickle or found is None:  # not a pickle at all, or broken
            raise AphqError(f"checkpoint {path} is not a readable torch checkpoint") from err
        raise AphqError(
            f"checkpoint {path} holds a pickled object ({found.group(1)}) that torch.load(weights_only=True) "
            "refuses; if you trust its source, pass --trust-checkpoint to load it anyway"
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, ImportError) as err:
        raise AphqError(f"checkpoint {path} is not a readable torch checkpoint ({err})") from err


def _unwrap(obj: object, path: Path) -> StateDict:
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise AphqError(f"checkpoint {path} holds no state_dict of tensors")
    out: StateDict = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise AphqError(f"checkpoint {path} entry {key!r} is a {type(value).__name__}, not a tensor")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


def detect_layout(state: Mapping[str, torch.Tensor]) -> Layout:
    """``mmdet`` when the backbone uses mmdetection's Swin names, else ``original``."""
    mmdet = any(k.startswith(("backbone.stages.", "backbone.patch_embed.projection.")) for k in state)
    return "mmdet" if mmdet else "original"


# mmdetection's PatchMerging gathers the 2x2 neighbours with nn.Unfold, which
# orders the 4C inputs channel-major with offsets (0,0),(0,1),(1,0),(1,1); the
# published code concatenates offset-major in the order (0,0),(1,0),(0,1),(1,1).
_SWAP = [0, 2, 1, 3]  # its own inverse


def _merge_to_mmdet(x: torch.Tensor) -> torch.Tensor:
    """Original ``(..., 4*C)`` order -> unfold order, on the last dimension."""
    lead, c4 = x.shape[:-1], x.shape[-1]
    x = x.reshape(*lead, 4, c4 // 4)[..., _SWAP, :]
    return x.transpose(-1, -2).reshape(*lead, c4)


def _merge_to_original(x: torch.Tensor) -> torch.Tensor:
    """Unfold order ``(..., C*4)`` -> original offset-major order."""
    lead, c4 = x.shape[:-1], x.shape[-1]
    x = x.reshape(*lead, c4 // 4, 4).transpose(-1, -2)[..., _SWAP, :]
    return x.reshape(*lead, c4)


_TO_MMDET = [  # (original pattern, mmdet replacement), applied to backbone keys
    (r"^backbone\.patch_embed\.proj\.", "backbone.patch_embed.projection."),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.attn\.", r"backbone.stages.\1.blocks.\2.attn.w_msa."),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc1\.", r"backbone.stages.\1.blocks.\2.ffn.layers.0.0."),
    (r"^backbone\.layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc2\.", r"backbone.stages.\1.blocks.\2.ffn.layers.1."),
    (r"^backbone\.layers\.(\d+)\.", r"backbone.stages.\1."),
]
_TO_ORIGINAL = [
    (r"^backbone\.patch_embed\.projection\.", "backbone.patch_embed.proj."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.attn\.w_msa\.", r"backbone.layers.\1.blocks.\2.attn."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.0\.0\.", r"backbone.layers.\1.blocks.\2.mlp.fc1."),
    (r"^backbone\.stages\.(\d+)\.blocks\.(\d+)\.ffn\.layers\.1\.", r"backbone.layers.\1.blocks.\2.mlp.fc2."),
    (r"^backbone\.stages\.(\d+)\.", r"backbone.layers.\1."),
]
_MERGE_KEY = re.compile(r"\.downsample\.(reduction\.weight|norm\.weight|norm\.bias)$")


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, repl in rules:
        new, n = re.subn(pattern, repl, key)
        if n:
            return new
    return key


def convert_layout(state: Mapping[str, torch.Tensor], to: Layout) -> StateDict:
    """Rename (and for patch merging, permute) backbone tensors into layout ``to``.

    Non-backbone keys are the same in both layouts and pass through.
    """
    if detect_layout(state) == to:
        return dict(state)
    rules, merge = (_TO_MMDET, _merge_to_mmdet) if to == "mmdet" else (_TO_ORIGINAL, _merge_to_original)
    out: StateDict = {}
    for key, value in state.items():
        if _MERGE_KEY.search(key):
            value = merge(value)
        out[_rename(key, rules)] = value
    return out


def load_into(model: torch.nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``model`` strictly, with one readable error for any mismatch.

    Args:
        source: how to name the checkpoint in messages (usually its path).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) such as {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) such as {_listing(unexpected)}")
        raise AphqError(f"checkpoint {source} does not fit the model: " + "; ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
             for k, v in expected.items() if state[k].shape != v.shape]
    if wrong:
        raise AphqError(f"checkpoint {source} does not fit the model: {len(wrong)} tensor(s) of another "
                        f"shape (checkpoint vs model), such as {_listing(wrong)}")
    # A NaN or Inf weight gives 0 AP (or a crash deep in calibration) much later; name it now.
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise AphqError(f"checkpoint {source} holds NaN or infinite values in {len(broken)} tensor(s), "
                        f"such as {_listing(broken)}")
    model.load_state_dict(state, strict=True)


def _listing(items: list[str]) -> str:
    more = f" (and {len(items) - _SHOW} more)" if len(items) > _SHOW else ""
    return ", ".join(items[:_SHOW]) + more


def load_checkpoint(model: torch.nn.Module, path: Path, *, trust_pickle: bool = False) -> Layout:
    """Read ``path``, convert it to the model's (original) layout, load strictly.

    Returns:
        The layout the file was in.
    """
    state = read_state_dict(path, trust_pickle=trust_pickle)
    layout = detect_layout(state)
    load_into(model, convert_layout(state, "original"), str(path))
    return layout


def save_checkpoint(model_or_state, path: Path, *, layout: Layout = "original",
                    meta: dict | None = None) -> Path:
    """Write weights as ``.safetensors`` or as an mmdetection-style ``.pth``.

    The ``.pth`` holds ``{"state_dict": ..., "meta": meta}`` with plain
    Python values in ``meta`` so it loads with ``weights_only=True``.
    """
    state = model_or_state.state_dict() if isinstance(model_or_state, torch.nn.Module) else model_or_state
    state = convert_layout({k: v.detach().cpu().contiguous() for k, v in state.items()}, layout)
    path = Path(path)
    if path.suffix == ".safetensors":
        data = save(state, metadata={k: str(v) for k, v in (meta or {}).items()})
    else:
        buf = io.BytesIO()
        torch.save({"state_dict": state, "meta": dict(meta or {})}, buf)
        data = buf.getvalue()
    return atomic_write_bytes(path, data)
