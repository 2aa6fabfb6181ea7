"""One reconstruction iteration, side by side: the published APHQ-ViT code against aphq.

    .venv/bin/python benchmarks/published.py --published ~/src/APHQ-ViT
    .venv/bin/python benchmarks/published.py --published ~/src/APHQ-ViT --rounds 5 --iters 20 --out timing.json

Why: issue #23 quotes how much slower a block-reconstruction iteration of the
published code is than ours. This makes that number reproducible from a user's
own checkout of the published code (``--published DIR``, the directory that
holds ``Object-Detection/``); none of its code is copied here, it is imported
from there at run time and runs unmodified.

What is timed, on both sides: one Swin block (dim 96, 3 heads, window 7,
MLP ratio 4) on a 56x56 token map (batch 1), W4/A4, with the same float
weights, the same float input, quantized-model input, float output target and
APH weight map (random tensors of the right shapes; the target is the float
block's own output), each side calibrated by its own code (both scale searches
trimmed alike to 32 candidates and one refinement round, ``CALIB_EQ_N`` and
``CALIB_ROUNDS``):

* published: its block wrapped by ``wrap_modules_in_net`` (4bit config,
  RepQ reparameterization on), calibrated by its ``QuantCalibrator``, AdaRound
  quantizers put in by ``BlockReconstructor.wrap_quantizers_in_net``, then
  ``BlockReconstructor.reconstruct_single_block(..., quant_act=True,
  mode='qdrop', drop_prob=0.5, quant_ratio=0.5)`` with metric
  ``hessian_perturb``. The reconstructor is made with ``object.__new__`` and
  given only what that method reads (``model``, ``metric``); the block is given
  the per-image lists that ``init_block_raw_data`` would have filled
  (``raw_input``, ``raw_out``, ``quanted_input``, ``raw_grad``) in memory.
* aphq: our ``SwinBlock`` quantized by ``detector_plan`` + ``apply_plan``,
  calibrated by ``calibrate_model``, then ``stages.reconstruct.reconstruct_unit``
  with ``ReconstructConfig(loss='aph')`` reading an in-memory cache.

Each side runs one warm-up round, then ``rounds`` alternating rounds of
``iters`` iterations (published first in each); a round's seconds per
iteration is its wall time over ``iters``, and the result is the median per
side and their ratio. Every round starts from the same calibrated state.
CPU only, torch's default thread count.

What is shimmed for the published code (only while its code runs, undone
after each call), and nothing else:

* ``torch.Tensor.cuda`` and ``torch.nn.Module.cuda`` return ``self`` (its
  calls to them keep tensors on the CPU);
* ``torch.cuda.empty_cache`` does nothing;
* during its calibration only, ``torch.cuda.is_available`` returns True and
  ``torch.cuda.get_device_properties`` reports a 16 GiB device: its matmul
  calibration refuses to run without CUDA and sizes its batch of scale
  candidates from the device memory (not while it reconstructs: torch's Adam
  would then believe in CUDA too);
* while its modules are imported: when ``timm`` is not installed, a stand-in
  ``timm.models.layers`` (``DropPath`` and ``to_2tuple`` from mmcv,
  ``torch.nn.init.trunc_normal_``) for the three names its
  ``swin_transformer.py`` imports; when ``tqdm`` is not installed, a
  ``tqdm.tqdm`` that draws nothing (it only opens, updates and labels bars); its ``swin_transformer.py`` is loaded from
  the checkout under the name ``mmdet.models.backbones.swin_transformer`` (the
  name its tools import it by) next to the installed mmdet 2.28.2 (whose
  ``SwinTransformer`` registry entry is set back afterwards); its
  ``Object-Detection/tools`` and ``Object-Detection`` (for ``mmcv_custom``) go
  at the end of ``sys.path``. ``sys.path``, the stand-in and the alias are
  removed again once loaded; its own top-level modules (``quant_layers``,
  ``quantizers``, ``quant_utils``, ``quant_configs``, ``mmcv_custom``) stay
  imported in this process.
* its prints and progress bars are silenced.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import io
import json
import platform
import statistics
import sys
import time
import types
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

# aphq from the checkout this file is in (not an installed copy): a benchmark run from a worktree of an
# older commit times that commit.
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import aphq_cli  # noqa: E402,F401  before mmdet is imported: it serves mmcv's ops (mmcv has no compiled ones)
from aphq_cli.allocator import retain_freed_memory  # noqa: E402

# The block of issue #23: Swin-T's first stage.
DIM, HEADS, WINDOW, MLP_RATIO, SIDE = 96, 3, 7, 4.0, 56
BITS = 4
UNIT_NAME = "backbone.layers.0.blocks.0"  # "backbone" in the name selects the published hessian_perturb loss
FAKE_DEVICE_MEMORY = 16 << 30  # what the shim reports as device memory (sizes the published candidate batches)
# Both sides' scale searches, trimmed alike (defaults: 128 candidates, 3 refinement rounds): the timing
# barely depends on the scales found, and the full searches of the two attention matmuls alone took half a
# minute (published) and over a minute (aphq) on two busy cores. 32 candidates still give a per-tensor
# input 2 ranges x 16 zero points.
CALIB_EQ_N, CALIB_ROUNDS = 32, 1


@dataclass(frozen=True)
class Timing:
    """Seconds per reconstruction iteration on each side (medians over rounds), and every round's value."""

    published_s_per_iter: float
    aphq_s_per_iter: float
    ratio: float  # published / aphq
    published_rounds: list[float]
    aphq_rounds: list[float]
    rounds: int
    iters: int
    shift: int
    torch_threads: int
    torch_version: str
    machine: str
    malloc_retained: bool  # aphq_cli.allocator ran, as every aphq command runs it ($APHQ_MALLOC=default: not)


# --- the shim ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _cpu_shim(calibrating: bool = False):
    """Let the published code's CUDA calls run on the CPU (the module docstring lists each), and undo it after.

    The claim that CUDA is available is made for calibration only: torch's own
    optimizers believe it too and then look for a CUDA stream.
    """
    saved = {(torch.Tensor, "cuda"): torch.Tensor.cuda, (nn.Module, "cuda"): nn.Module.cuda,
             (torch.cuda, "empty_cache"): torch.cuda.empty_cache,
             (torch.cuda, "is_available"): torch.cuda.is_available,
             (torch.cuda, "get_device_properties"): torch.cuda.get_device_properties}
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.cuda.empty_cache = lambda: None
    if calibrating:
        torch.cuda.is_available = lambda: True
        torch.cuda.get_device_properties = lambda *a, **kw: types.SimpleNamespace(total_memory=FAKE_DEVICE_MEMORY)
    try:
        yield
    finally:
        for (owner, name), value in saved.items():
            setattr(owner, name, value)


@contextlib.contextmanager
def _quiet():
    """Swallow the published code's prints and tqdm bars."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


class _NoBar:
    """``tqdm.tqdm`` where tqdm is not installed: the published code only opens, updates and labels its bars."""

    def __init__(self, *args, **kwargs) -> None:
        pass

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc) -> None:
        pass

    def update(self, *args) -> None:
        pass

    def set_description(self, *args, **kwargs) -> None:
        pass


def _stand_ins() -> dict[str, types.ModuleType]:
    """Modules the published code imports that our environment may lack (see the docstring), by name."""
    out = {}
    if importlib.util.find_spec("timm") is None:  # the three names its swin_transformer.py imports
        from mmcv.cnn.bricks import DropPath
        from mmcv.utils import to_2tuple

        timm, models, layers = (types.ModuleType(n) for n in ("timm", "timm.models", "timm.models.layers"))
        layers.DropPath, layers.to_2tuple, layers.trunc_normal_ = DropPath, to_2tuple, nn.init.trunc_normal_
        timm.models, models.layers = models, layers
        out |= {"timm": timm, "timm.models": models, "timm.models.layers": layers}
    if importlib.util.find_spec("tqdm") is None:
        out["tqdm"] = types.ModuleType("tqdm")
        out["tqdm"].tqdm = _NoBar
    return out


def load_published(root: Path) -> types.SimpleNamespace:
    """Import the modules of the published checkout at ``root`` that the benchmark uses (see the docstring)."""
    od = Path(root).expanduser().resolve() / "Object-Detection"
    swin_file = od / "mmdet" / "models" / "backbones" / "swin_transformer.py"
    if not (od / "tools" / "quant_utils" / "block_recon.py").is_file() or not swin_file.is_file():
        raise FileNotFoundError(f"{root} is not a checkout of the published APHQ-ViT code "
                                "(no Object-Detection/tools/quant_utils/block_recon.py)")
    import mmdet.models  # noqa: F401  the installed mmdet first, so the checkout's copy never shadows it
    from mmdet.models.builder import BACKBONES

    alias = "mmdet.models.backbones.swin_transformer"
    stand_ins = _stand_ins()
    saved_path, saved_swin = list(sys.path), BACKBONES._module_dict.pop("SwinTransformer", None)
    sys.path += [str(od / "tools"), str(od)]
    sys.modules.update(stand_ins)
    try:
        spec = importlib.util.spec_from_file_location(alias, swin_file)
        swin = importlib.util.module_from_spec(spec)
        sys.modules[alias] = swin
        spec.loader.exec_module(swin)
        with _quiet():
            mods = {name: importlib.import_module(name) for name in (
                "quant_utils.wrap_net", "quant_utils.calibrator", "quant_utils.block_recon", "quant_configs.4bit")}
    finally:
        sys.path[:] = saved_path
        for name in [alias, *stand_ins]:
            sys.modules.pop(name, None)
        if saved_swin is not None:
            BACKBONES._module_dict["SwinTransformer"] = saved_swin
    return types.SimpleNamespace(swin=swin, wrap_net=mods["quant_utils.wrap_net"],
                                 calibrator=mods["quant_utils.calibrator"], block_recon=mods["quant_utils.block_recon"],
                                 config=mods["quant_configs.4bit"].Config)


# --- the shared inputs ------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """One image's tensors as ``(B, L, C)`` tokens (the published layout); ours view them ``(B, H, W, C)``."""

    fp_in: torch.Tensor
    q_in: torch.Tensor
    target: torch.Tensor
    aph: torch.Tensor
    mask: torch.Tensor | None  # the shifted-window mask, or None for shift 0


def make_inputs(float_block: nn.Module, shift: int, seed: int) -> Inputs:
    """Random float input, a perturbed copy as the quantized-model input, the float block's output, an APH map.

    The APH map is positive and averages 1, as the published ``init_block_raw_grad`` normalizes it.
    """
    from aphq_cli.models.swin import shifted_window_mask

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(1, SIDE * SIDE, DIM, generator=gen)
    xq = x + 0.1 * torch.randn(x.shape, generator=gen)
    mask = shifted_window_mask(SIDE, SIDE, WINDOW, shift, torch.device("cpu")) if shift else None
    with torch.no_grad():
        y = float_block(x, mask, SIDE, SIDE)
    aph = torch.rand(y.shape, generator=gen) + 1e-3
    return Inputs(x, xq, y, aph * aph.numel() / aph.sum(), mask)


# --- the published side -----------------------------------------------------------------------------------------

class _Detector(nn.Module):
    """The call the published calibrator makes (``model(img=, img_metas=, return_loss=)``), around one block."""

    def __init__(self, block: nn.Module, mask: torch.Tensor | None) -> None:
        super().__init__()
        self.block, self.mask = block, mask

    def forward(self, img, img_metas=None, return_loss=False):
        return self.block(img[0], self.mask, SIDE, SIDE)


def _batches(x: torch.Tensor) -> list[dict]:
    """A one-image calibration loader in the shape the published calibrator reads (``calib_data['img'].data``)."""
    return [{"img": types.SimpleNamespace(data=[x]), "img_metas": types.SimpleNamespace(data=[{}])}]


class Published:
    """The published block, quantized and calibrated by the published code; ``round(iters)`` times one call."""

    def __init__(self, pub: types.SimpleNamespace, block: nn.Module, inputs: Inputs) -> None:
        self.pub, self.inputs = pub, inputs
        cfg = pub.config()
        cfg.w_bit = cfg.a_bit = BITS
        cfg.eq_n, cfg.search_round = CALIB_EQ_N, CALIB_ROUNDS
        self.model = _Detector(block, inputs.mask)
        with _cpu_shim(calibrating=True), _quiet():
            pub.wrap_net.wrap_modules_in_net(self.model, cfg, reparam=True, recon=False)
            pub.calibrator.QuantCalibrator(self.model, _batches(inputs.fp_in), 1).batching_quant_calib()
            recon = object.__new__(pub.block_recon.BlockReconstructor)
            recon.model, recon.metric = self.model, "hessian_perturb"
            recon.wrap_quantizers_in_net()
            pub.block_recon.BlockReconstructor._prepare_module_data_init(self.model.block)
        self.recon = recon
        self.start = {k: v.clone() for k, v in self.model.state_dict().items()}

    def _reset(self) -> None:
        """The state right after ``wrap_quantizers_in_net``, and the data ``init_block_raw_data`` would have set."""
        block, x = self.model.block, self.inputs
        self.model.load_state_dict(self.start)
        for module in block.modules():
            if isinstance(module, self.pub.block_recon.AdaRoundQuantizer):
                module.soft_targets = True  # reconstruct_single_block turns it off when it ends
        block.raw_input = [[x.fp_in], [x.mask], [SIDE], [SIDE]]  # x, mask_matrix, H, W per image
        block.quanted_input, block.raw_out, block.raw_grad = [x.q_in], [x.target], [x.aph]
        block.quanted_out = block.quanted_grad = None

    def round(self, iters: int) -> float:
        self._reset()
        with _cpu_shim(), _quiet():
            start = time.perf_counter()
            self.recon.reconstruct_single_block(UNIT_NAME, self.model.block, torch.device("cpu"), iters=iters,
                                                quant_act=True, mode="qdrop", drop_prob=0.5, quant_ratio=0.5)
            return time.perf_counter() - start


# --- our side ---------------------------------------------------------------------------------------------------

class _Memory:
    """The three cache reads ``reconstruct_unit`` makes, from memory (one image)."""

    count = 1

    def __init__(self, inputs: Inputs) -> None:
        shape = (1, SIDE, SIDE, DIM)
        self._fp, self._q, self._y = (t.view(shape) for t in (inputs.fp_in, inputs.q_in, inputs.target))

    def fp_in(self, k: int, i: int) -> torch.Tensor:
        return self._fp

    def q_in(self, k: int, i: int) -> torch.Tensor:
        return self._q

    def target(self, k: int, i: int) -> torch.Tensor:
        return self._y


class Ours:
    """Our block with the same float weights, quantized and calibrated by aphq; ``round(iters)`` times one call."""

    def __init__(self, float_state: dict, inputs: Inputs, shift: int) -> None:
        from aphq_cli.models.plan import detector_plan
        from aphq_cli.models.swin import SwinBlock
        from aphq_cli.quant.calib import SearchSettings, calibrate_model
        from aphq_cli.quant.wrap import apply_plan

        block = SwinBlock(DIM, HEADS, WINDOW, shift, MLP_RATIO, qkv_bias=True, qk_scale=None, drop=0.0,
                          attn_drop=0.0, drop_path=0.0).eval()
        block.load_state_dict(float_state)
        # Held one level down, so the plan sees "0.attn.qkv" and pairs it with "0.norm1" (the RepQ fold).
        holder = nn.Sequential(block)
        plan = detector_plan(holder, BITS, BITS)
        apply_plan(holder, plan)
        settings = SearchSettings(w_bits=BITS, a_bits=BITS, eq_n=CALIB_EQ_N, matmul_eq_n=CALIB_EQ_N,
                                  search_round=CALIB_ROUNDS)
        calibrate_model(holder, plan, [inputs.fp_in.view(1, SIDE, SIDE, DIM)], settings, images=1,
                        forward=lambda model, x: model(x))
        self.block, self.cache = block, _Memory(inputs)
        self.aph = inputs.aph.view(1, SIDE, SIDE, DIM)
        self.start = {k: v.clone() for k, v in block.state_dict().items()}

    def round(self, iters: int) -> float:
        from stages.reconstruct import ReconstructConfig, reconstruct_unit

        self.block.load_state_dict(self.start)  # reconstruct_unit hardens the rounding into the weights when it ends
        config = ReconstructConfig(loss="aph", iters=iters)
        start = time.perf_counter()
        reconstruct_unit(self.block, self.cache, 0, lambda i: self.aph, config, seed=0)
        return time.perf_counter() - start


# --- the measurement --------------------------------------------------------------------------------------------

def measure(published: str | Path, rounds: int = 5, iters: int = 20, shift: int = 0, seed: int = 0,
            progress=None) -> Timing:
    """Time ``rounds`` alternating rounds of ``iters`` reconstruction iterations on each side (after a warm-up each).

    Args:
        published: the published checkout (the directory holding ``Object-Detection/``).
        shift: the block's window shift (0: a W-MSA block, as Swin's first; 3: an SW-MSA one).
        progress: optional callable ``(message)``.
    """
    say = progress or (lambda message: None)
    # As the aphq command does at its start; process-wide, so the published side runs under it too.
    retained = retain_freed_memory()
    pub = load_published(Path(published))
    torch.manual_seed(seed)
    float_block = pub.swin.SwinTransformerBlock(DIM, HEADS, window_size=WINDOW, shift_size=shift,
                                                mlp_ratio=MLP_RATIO, qkv_bias=True).eval()
    inputs = make_inputs(float_block, shift, seed)
    float_state = {k: v.clone() for k, v in float_block.state_dict().items()}
    say("calibrating (published)")
    theirs = Published(pub, float_block, inputs)
    say("calibrating (aphq)")
    ours = Ours(float_state, inputs, shift)
    times: dict[str, list[float]] = {"published": [], "aphq": []}
    for r in range(rounds + 1):  # round 0 is the warm-up
        for side, run in (("published", theirs.round), ("aphq", ours.round)):
            per_iter = run(iters) / iters
            if r:
                times[side].append(per_iter)
            say(f"{'warm-up' if not r else f'round {r}/{rounds}'} {side}: {per_iter:.4f} s/iter")
    pub_s, ours_s = statistics.median(times["published"]), statistics.median(times["aphq"])
    machine = f"{platform.node()} ({platform.processor() or platform.machine()})"
    return Timing(pub_s, ours_s, pub_s / ours_s, times["published"], times["aphq"], rounds, iters, shift,
                  torch.get_num_threads(), torch.__version__, machine, retained)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--published", type=Path, required=True,
                    help="checkout of the published APHQ-ViT code (the directory holding Object-Detection/)")
    ap.add_argument("--rounds", type=int, default=5, help="timed rounds per side (after one warm-up each)")
    ap.add_argument("--iters", type=int, default=20, help="reconstruction iterations per round")
    ap.add_argument("--shift", type=int, default=0, choices=(0, WINDOW // 2), help="the block's window shift")
    ap.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.iters < 1:
        ap.error("--rounds and --iters must be positive")
    if not (args.published / "Object-Detection" / "tools" / "quant_utils" / "block_recon.py").is_file():
        ap.error(f"{args.published} is not a checkout of the published APHQ-ViT code "
                 "(no Object-Detection/tools/quant_utils/block_recon.py)")
    result = measure(args.published, args.rounds, args.iters, args.shift,
                     progress=lambda message: print(message, file=sys.stderr, flush=True))
    print(f"published {result.published_s_per_iter:.4f} s/iter, aphq {result.aphq_s_per_iter:.4f} s/iter, "
          f"published/aphq {result.ratio:.2f}x (median of {result.rounds} rounds x {result.iters} iterations, "
          f"{result.torch_threads} threads, malloc {'retained' if result.malloc_retained else 'default'})")
    if args.out is not None:
        args.out.write_text(json.dumps(asdict(result), indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
