"""Swin Transformer backbone in the layout of the published detection checkpoints.

Parameter names follow Swin-Transformer-Object-Detection (``patch_embed.proj``,
``layers.{i}.blocks.{j}.attn.qkv``, ``layers.{i}.downsample.reduction``,
``norm{i}``) so those checkpoints load unchanged. The structure differs from
that code in two ways that the quantization stages rely on:

* Every unit (patch embedding, Swin block, patch merging) maps a channels-last
  map ``(B, H, W, C)`` to another, so a unit can be run alone on cached inputs,
  and a forward hook sees the whole output and may replace it (APH
  perturbation, block reconstruction). Each block derives its own attention
  mask from its input's size, so no side arguments are needed.
* The window attention's two matrix products are ``MatMul`` submodules, and the
  MLP activation is a submodule, so quantizers and the GELU->ReLU swap can
  replace them by name.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmdet.models.builder import BACKBONES


class MatMul(nn.Module):
    """``a @ b`` as a module, so its operands can be hooked and quantized."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class DropPath(nn.Module):
    """Stochastic depth per sample; the identity in eval mode."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Mlp(nn.Module):
    """fc1 -> act -> fc2; ``act`` is swapped for ReLU by mlp-recon."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


def relative_position_index(window: int) -> torch.Tensor:
    """Index into the bias table for every pair of tokens in a window.

    Returns:
        ``(window**2, window**2)`` int64: for tokens i, j at (hi, wi), (hj, wj),
        ``(hi - hj + window - 1) * (2 * window - 1) + (wi - wj + window - 1)``.
    """
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij"))
    coords = coords.flatten(1)  # (2, N)
    rel = coords[:, :, None] - coords[:, None, :] + (window - 1)  # (2, N, N)
    return rel[0] * (2 * window - 1) + rel[1]


def window_partition(x: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H, W, C)`` with H, W multiples of ``window`` -> ``(B*nW, window*window, C)``."""
    b, h, w, c = x.shape
    x = x.view(b, h // window, window, w // window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def window_reverse(windows: torch.Tensor, window: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B*nW, window*window, C)`` -> ``(B, H, W, C)``."""
    c = windows.shape[-1]
    b = windows.shape[0] // ((h // window) * (w // window))
    x = windows.view(b, h // window, w // window, window, window, c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)


def shifted_window_mask(hp: int, wp: int, window: int, shift: int, device: torch.device) -> torch.Tensor:
    """Additive mask that keeps shifted windows from attending across the wrap.

    After a cyclic shift, a window at the border holds tokens from up to four
    regions that were not neighbours in the image; pairs from different
    regions get -100 (softmax weight ~0), as in the published code.

    Returns:
        ``(nW, window*window, window*window)`` float mask of 0 and -100.
    """
    region = torch.zeros(1, hp, wp, 1, device=device)
    bands = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    label = 0
    for hs in bands:
        for ws in bands:
            region[:, hs, ws, :] = label
            label += 1
    ids = window_partition(region, window).squeeze(-1)  # (nW, N)
    diff = ids[:, None, :] - ids[:, :, None]
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows with a relative position bias."""

    def __init__(self, dim: int, window: int, heads: int, qkv_bias: bool = True,
                 qk_scale: float | None = None, attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        self.dim, self.window, self.heads = dim, window, heads
        self.scale = qk_scale or (dim // heads) ** -0.5
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        # Persistent: the published checkpoints carry it.
        self.register_buffer("relative_position_index", relative_position_index(window))
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.matmul_qk = MatMul()  # q @ k^T
        self.softmax = nn.Softmax(dim=-1)
        self.matmul_av = MatMul()  # softmax @ v
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def position_bias(self) -> torch.Tensor:
        """``(heads, N, N)`` bias gathered from the table."""
        n = self.window * self.window
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(n, n, self.heads).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend within windows.

        Args:
            x: ``(B*nW, N, C)`` tokens of each window.
            mask: ``(nW, N, N)`` additive mask for shifted windows, or None.
        """
        bw, n, c = x.shape
        qkv = self.qkv(x).reshape(bw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]  # (B*nW, heads, N, d)
        attn = self.matmul_qk(q, k.transpose(-2, -1)) + self.position_bias().unsqueeze(0)
        if mask is not None:
            nw = mask.shape[0]
            attn = attn.view(bw // nw, nw, self.heads, n, n) + mask[None, :, None]
            attn = attn.view(bw, self.heads, n, n)
        attn = self.attn_drop(self.softmax(attn))
        out = self.matmul_av(attn, v).transpose(1, 2).reshape(bw, n, c)
        return self.proj_drop(self.proj(out))


class SwinBlock(nn.Module):
    """One (shifted-)window attention block: ``(B, H, W, C) -> (B, H, W, C)``."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, mlp_ratio: float,
                 qkv_bias: bool, qk_scale: float | None, drop: float, attn_drop: float,
                 drop_path: float) -> None:
        super().__init__()
        self.window, self.shift = window, shift
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, window, heads, qkv_bias, qk_scale, attn_drop, drop)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        # What padded tokens hold after norm1: zeros, unless a scale fold
        # (quant/wrap.py) shifted norm1's output, where a float-model zero is
        # -b. A parameter (not a buffer) only once set, so float checkpoints
        # load strictly and quantized artifacts carry it like a created bias.
        self.pad_value: nn.Parameter | None = None
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def attention_mask(self, hp: int, wp: int, device: torch.device) -> torch.Tensor | None:
        if self.shift == 0:
            return None
        key = (hp, wp, str(device))
        if key not in self._mask_cache:
            self._mask_cache[key] = shifted_window_mask(hp, wp, self.window, self.shift, device)
        return self._mask_cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        shortcut = x
        x = self.norm1(x)
        # Pad right/bottom to whole windows; padded tokens are cropped below.
        pad_b, pad_r = (-h) % self.window, (-w) % self.window
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        if self.pad_value is not None and (pad_b or pad_r):
            x[:, h:, :, :] = self.pad_value
            x[:, :, w:, :] = self.pad_value
        hp, wp = h + pad_b, w + pad_r
        if self.shift:
            x = torch.roll(x, shifts=(-self.shift, -self.shift), dims=(1, 2))
        windows = self.attn(window_partition(x, self.window), self.attention_mask(hp, wp, x.device))
        x = window_reverse(windows, self.window, hp, wp)
        if self.shift:
            x = torch.roll(x, shifts=(self.shift, self.shift), dims=(1, 2))
        x = shortcut + self.drop_path(x[:, :h, :w, :].contiguous())
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 neighbours -> one token: ``(B, H, W, C) -> (B, ceil(H/2), ceil(W/2), 2C)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[1:3]
        x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        # Concatenation order (0,0), (1,0), (0,1), (1,1) as (row, col) offsets:
        # the order the published reduction weights expect.
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    """Image ``(B, 3, H, W)`` -> patch tokens ``(B, H/p, W/p, C)`` (sizes rounded up)."""

    def __init__(self, patch: int, in_chans: int, dim: int, norm: bool) -> None:
        super().__init__()
        self.patch = patch
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:]
        x = F.pad(x, (0, (-w) % self.patch, 0, (-h) % self.patch))
        x = self.proj(x).permute(0, 2, 3, 1)  # (B, H', W', C)
        return self.norm(x) if self.norm is not None else x


class SwinStage(nn.Module):
    """A sequence of blocks, alternating plain and shifted windows, then an optional merge."""

    def __init__(self, dim: int, depth: int, heads: int, window: int, mlp_ratio: float,
                 qkv_bias: bool, qk_scale: float | None, drop: float, attn_drop: float,
                 drop_path: Sequence[float], downsample: bool) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            SwinBlock(dim, heads, window, 0 if i % 2 == 0 else window // 2, mlp_ratio,
                      qkv_bias, qk_scale, drop, attn_drop, drop_path[i])
            for i in range(depth))
        self.downsample = PatchMerging(dim) if downsample else None


@BACKBONES.register_module()
class APHQSwinTransformer(nn.Module):
    """Swin Transformer backbone returning channels-first maps for the FPN.

    Arguments use the published project's names (``embed_dim``, ``depths``,
    ``num_heads``, ``window_size``, ``ape``, ``patch_norm``); see
    :func:`aphq_cli.models.configs.normalize_backbone` for configs written
    for mmdetection's own ``SwinTransformer``.
    """

    def __init__(self, pretrain_img_size: int = 224, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: float | None = None,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2,
                 ape: bool = False, patch_norm: bool = True, out_indices: Sequence[int] = (0, 1, 2, 3),
                 frozen_stages: int = -1, use_checkpoint: bool = False, init_cfg=None) -> None:
        super().__init__()
        if ape:
            raise ValueError("absolute position embedding (ape=True) is not supported; "
                             "the detection checkpoints do not use it")
        del pretrain_img_size, use_checkpoint, frozen_stages, init_cfg  # training-only options
        self.out_indices = tuple(out_indices)
        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm)
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        self.num_features = [embed_dim * 2 ** i for i in range(len(depths))]
        for i, depth in enumerate(depths):
            start = sum(depths[:i])
            self.layers.append(SwinStage(
                self.num_features[i], depth, num_heads[i], window_size, mlp_ratio, qkv_bias,
                qk_scale, drop_rate, attn_drop_rate, rates[start:start + depth],
                downsample=i < len(depths) - 1))
        for i in self.out_indices:
            self.add_module(f"norm{i}", nn.LayerNorm(self.num_features[i]))
        self.apply(_init_weights)

    def init_weights(self, pretrained=None) -> None:
        """Weights come from a checkpoint; mmdetection calls this on build."""

    def forward(self, img: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = self.pos_drop(self.patch_embed(img))
        outs = []
        for i, stage in enumerate(self.layers):
            for block in stage.blocks:
                x = block(x)
            if i in self.out_indices:
                outs.append(getattr(self, f"norm{i}")(x).permute(0, 3, 1, 2).contiguous())
            if stage.downsample is not None:
                x = stage.downsample(x)
        return tuple(outs)

    def units(self) -> list[tuple[str, nn.Module]]:
        """The reconstruction units in forward order: patch embedding, blocks, merges.

        Returns:
            ``(qualified name relative to the backbone, module)`` pairs.
        """
        units: list[tuple[str, nn.Module]] = [("patch_embed", self.patch_embed)]
        for i, stage in enumerate(self.layers):
            units += [(f"layers.{i}.blocks.{j}", b) for j, b in enumerate(stage.blocks)]
            if stage.downsample is not None:
                units.append((f"layers.{i}.downsample", stage.downsample))
        return units


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
