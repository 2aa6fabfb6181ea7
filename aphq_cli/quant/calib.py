"""Calibration: record every quantized layer's float inputs, then search its quantizers.

The recorder keeps a bounded, evenly strided sample of each layer's input on
the CPU (``max_values`` numbers per layer; ``max_windows`` windows of an
attention matmul, evenly spread over every window of the image), so memory
does not grow with image size or count beyond that bound: for Swin-T (about
150 quantized layers) at the defaults, under 1 GB.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

from aphq_cli.errors import AphqError
from aphq_cli.quant.modules import QuantConv2d, QuantMatMul, Quantizer
from aphq_cli.quant.primitives import matmul_percentiles, qmax, search_matmul, search_rowwise
from aphq_cli.quant.plan import QuantPlan
from aphq_cli.quant.wrap import fold_channel_scales, quant_layers, reparam_factors


@dataclass(frozen=True)
class SearchSettings:
    """The scale-search knobs of method.md §3 and the per-layer sample bounds.

    Attributes:
        w_bits, a_bits: 2..8.
        eq_n, pct, search_round, matmul_eq_n: method.md §3.
        max_values, max_windows: sample bounds per layer (memory).
        reparam: RepQ scale reparameterization of LayerNorm-fed inputs
            (applied when w_bits == a_bits).
        fc2_zero: post-ReLU fc2 inputs (after mlp-recon) get zero point 0.
    """

    w_bits: int = 4
    a_bits: int = 4
    eq_n: int = 128
    pct: float = 0.999
    search_round: int = 3
    matmul_eq_n: int = 128
    max_values: int = 1_000_000
    max_windows: int = 256
    reparam: bool = True
    fc2_zero: bool = False

    def __post_init__(self) -> None:
        for name in ("w_bits", "a_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
                raise AphqError(f"--{name.replace('_', '-')} must be an integer from 2 to 8, got {bits}")
        for name in ("eq_n", "matmul_eq_n", "max_values", "max_windows"):
            if getattr(self, name) < 1:
                raise AphqError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.5 < self.pct <= 1.0:
            raise AphqError(f"pct must be in (0.5, 1], got {self.pct}")
        if self.search_round < 0:
            raise AphqError(f"search_round must be >= 0, got {self.search_round}")


class InputRecorder:
    """Forward pre-hooks that sample each quantized layer's input, for one scope."""

    def __init__(self, layers: dict[str, nn.Module], max_values: int, max_windows: int, images: int) -> None:
        self.layers = layers
        self.per_image = max(1, max_values // max(1, images))
        self.max_windows = max(1, max_windows // max(1, images))
        self.rows: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
        self.pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in layers}

    def _hook(self, name: str) -> Callable:
        def record(module: nn.Module, args: tuple) -> None:
            if isinstance(module, QuantMatMul):
                a, b = args
                # Windows from the whole image, not its top rows: the first 256 of a
                # 1333x800 stage-1 map would be its top ~18 %.
                step = max(1, math.ceil(a.shape[0] / self.max_windows))
                self.pairs[name].append((a[::step].detach().cpu(), b[::step].detach().cpu()))
                return
            x = args[0].detach()
            if isinstance(module, QuantConv2d):
                x = x.movedim(1, -1)  # channels last, as for a Linear
            x = x.reshape(-1, x.shape[-1])  # (M, C)
            step = max(1, math.ceil(x.numel() / self.per_image))
            self.rows[name].append(x[::step].cpu())
        return record

    @contextlib.contextmanager
    def attached(self) -> Iterator["InputRecorder"]:
        handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def _flat(rows: torch.Tensor) -> torch.Tensor:
    return rows.reshape(1, -1)


@torch.no_grad()
def calibrate_layer(model: nn.Module, plan: QuantPlan, name: str, layer: nn.Module, recorder: InputRecorder,
                    settings: SearchSettings) -> None:
    """Search and set the quantizers of one layer from its recorded inputs."""
    if isinstance(layer, QuantMatMul):
        a = torch.cat([p[0] for p in recorder.pairs[name]])
        b = torch.cat([p[1] for p in recorder.pairs[name]])
        sa, za, sb, zb = search_matmul(a, b, settings.a_bits, matmul_percentiles(settings.matmul_eq_n),
                                       settings.search_round)
        layer.a_quant.set_params(sa, za)
        layer.b_quant.set_params(sb, zb)
        return
    x = torch.cat(recorder.rows[name]).float()  # (M, C)
    bits = layer.a_quant.bits
    lp = plan.layers[name]
    if _folds(lp, settings):
        # Per-channel first, folded into the LayerNorm so one scale serves (RepQ).
        s_c, z_c = search_rowwise(x.T.contiguous(), bits, eq_n=settings.eq_n, pct=settings.pct)
        _, _, r, b = reparam_factors(s_c, z_c, bits)
        pad = model.get_submodule(lp.pad_owner) if lp.pad_owner is not None else None
        fold_channel_scales(model.get_submodule(lp.norm), layer, r, b, pad)
        x = x / r - b
    fixed_zero = settings.fc2_zero and lp.relu_input
    s, z = search_rowwise(_flat(x), bits, eq_n=settings.eq_n, pct=settings.pct, fixed_zero=fixed_zero)
    layer.a_quant.set_params(s, z)
    # One search row per output channel, or per group of a row (w_group).
    w = layer.weight.detach().reshape(-1, layer.w_group or layer.weight[0].numel())
    ws, wz = search_rowwise(w, settings.w_bits, eq_n=settings.eq_n, pct=settings.pct)
    layer.w_quant.set_params(ws, wz)


def _folds(lp, settings: SearchSettings) -> bool:
    """Whether this layer's input scales fold into its LayerNorm (RepQ, when weights and inputs share bits)."""
    return lp.kind == "linear" and lp.norm is not None and settings.reparam and settings.a_bits == settings.w_bits


def calibrate_model(model: nn.Module, plan: QuantPlan, batches, settings: SearchSettings, *, images: int,
                    forward: Callable[[nn.Module, object], None], progress=None) -> list[str]:
    """Record inputs over ``batches`` with the model in float, then calibrate every layer.

    Args:
        plan: the plan ``model`` was quantized by (which norms fold, which inputs follow a ReLU).
        batches: iterable of model inputs; ``forward(model, batch)`` runs one.
        images: how many batches, to split the sample bound between them.
        progress: optional callable ``(done, total)`` over layers.

    Returns:
        Names of the layers whose LayerNorm was reparameterized.
    """
    layers = quant_layers(model)
    recorder = InputRecorder(layers, settings.max_values, settings.max_windows, images)
    with recorder.attached():
        for batch in batches:
            forward(model, batch)
    folded = []
    for i, (name, layer) in enumerate(layers.items()):
        calibrate_layer(model, plan, name, layer, recorder, settings)
        if _folds(plan.layers[name], settings):
            folded.append(name)
        recorder.rows[name], recorder.pairs[name] = [], []  # free as we go
        if progress is not None:
            progress(i + 1, len(layers))
    return folded


@torch.no_grad()
def minmax_calibrate(module: nn.Module, x) -> None:
    """Every quantizer of ``module`` from the min and max of what it sees on one forward of ``x``.

    Not the method's search (:func:`calibrate_model`): a quick stand-in for
    timing an iteration and for tests, where the scales only need to be
    plausible. Each quantizer reduces over the dimensions its scale is
    broadcast along (per tensor, per output channel, per head); the range
    keeps 0 inside it, as the search's candidates do.
    """
    seen: dict[Quantizer, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(q: Quantizer, args: tuple) -> None:
        v = args[0]
        shape = (1,) * (v.dim() - q.scale.dim()) + tuple(q.scale.shape)  # the scale, as broadcast against v
        over = [d for d in range(v.dim()) if shape[d] == 1]
        lo = v.amin(dim=over, keepdim=True).clamp(max=0).reshape(q.scale.shape)
        hi = v.amax(dim=over, keepdim=True).clamp(min=0).reshape(q.scale.shape)
        scale = ((hi - lo) / qmax(q.bits)).clamp_min(1e-8)
        seen[q] = (scale, torch.round(-lo / scale))

    handles = [m.register_forward_pre_hook(record) for m in module.modules() if isinstance(m, Quantizer)]
    try:
        module(tuple(x) if isinstance(x, (list, tuple)) else x)
    finally:
        for h in handles:
            h.remove()
    for q, (scale, zero_point) in seen.items():
        q.set_params(scale, zero_point)
