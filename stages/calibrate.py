"""Stage: calibrate. The quantized detector with searched scales (method.md §2-3).

Writes ``RUN/calibrate.safetensors``: every quantizer's scale and zero point
(``quant:<module>.scale``/``.zero_point``) and the parameters the scale
reparameterization changed (``param:<name>``). The header records the model,
checkpoint, calibration images and settings, and their fingerprints, so the
same inputs again are a cache hit and :func:`aphq_cli.runs.load_stage` can
rebuild the quantized model without calibrating again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from aphq_cli.artifacts import sha256_file
from aphq_cli.data.coco import check_calib_split
from aphq_cli.errors import AphqError
from aphq_cli.headers import StageRecord
from aphq_cli.models.plan import check_head_group, detector_plan
from aphq_cli.models.zoo import build_heads
from aphq_cli.quant.calib import SearchSettings, calibrate_model
from aphq_cli.quant.wrap import apply_plan, quantization_map
from aphq_cli.runs import ModelSource, quantized_tensors, read_stage, stage_path, writes_run
from aphq_cli.settings import ADDED_LATER, resolve_settings, settings_record, with_arguments
from aphq_cli.stage import StageResult, StageSpec, open_stage

STAGE = "calibrate"
# 2: a folded Swin block pads with -b (float-exact); 3: interpolated percentiles; 4: conv_logits
# quantized, matmul windows sampled over the whole image. Older artifacts recompute.
CONFIG_VERSION = 4


@dataclass(frozen=True)
class CalibrateConfig(SearchSettings):
    """Typed, versioned settings of the calibrate stage: the search settings plus the data.

    Attributes:
        calib_images: the first N training images (test pipeline). The paper
            uses 1 for COCO; testbed configs set their own default.
        calib_split: ``train`` (default), or ``val``: the published protocol,
            which calibrates on the first annotated image of the evaluation split.
        head_w_group: 0 (the published method): every weight has one scale
            and zero point per output channel. Else the RPN and RoI heads'
            weights have one per group of this many consecutive inputs
            (beyond the paper, issue #18; still 4-bit codes, plus a scale and
            zero point per group). It must divide every head layer's inputs.
        version: bumps when a setting's meaning changes.
    """

    calib_images: int = 1
    calib_split: str = "train"
    head_w_group: int = field(default=0, metadata=ADDED_LATER)
    version: int = field(default=CONFIG_VERSION)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.calib_images < 1:
            raise AphqError(f"--calib-images must be at least 1, got {self.calib_images}")
        if self.head_w_group < 0:
            raise AphqError(f"head_w_group must be 0 (per output channel) or a group size, got {self.head_w_group}")
        check_calib_split(self.calib_split)



SPEC = StageSpec(STAGE, CalibrateConfig)


def resolve_config(cfg, overrides: dict, file_values: dict | None = None) -> CalibrateConfig:
    """Defaults, the model config's ``aphq_defaults``, a ``--quant-config`` section, then the command line."""
    return resolve_settings(CalibrateConfig, cfg, STAGE, overrides, file_values)


@writes_run
def calibrate(*, model: str, run: Path, w_bits: int | None = None, a_bits: int | None = None,
              calib_images: int | None = None, calib_split: str | None = None, checkpoint: Path | None = None,
              data: Path | None = None, image_list: Path | None = None, device: str = "cpu", force: bool = False,
              trust_checkpoint: bool = False, settings: dict | None = None, quant_config: str | Path | None = None,
              progress=None) -> StageResult:
    """Calibrate ``model`` into ``run/calibrate.safetensors``.

    Args:
        model: built-in name or mmdetection config path.
        run: the run folder.
        w_bits, a_bits, calib_images, calib_split: override the config defaults.
        image_list: a text file of training image ids (one per line) to
            calibrate on instead of the first ``calib_images`` images.
        settings: further :class:`CalibrateConfig` fields.
        quant_config: a ``--quant-config`` file or preset name; its
            ``[calibrate]`` settings sit below the explicit arguments.
        force: recompute even when the artifact is current.
        progress: optional callable ``(done, total)``.
    """
    ids = read_image_list(image_list) if image_list is not None else None
    mlp = stage_path(run, "mlp-recon")
    mlp = mlp if mlp.is_file() else None
    overrides = with_arguments(settings, w_bits=w_bits, a_bits=a_bits, calib_split=calib_split,
                               calib_images=len(ids) if ids else calib_images,
                               # post-ReLU fc2 inputs: zero point fixed at 0 (method.md §2)
                               fc2_zero=True if mlp is not None else None)
    stage = open_stage(
        SPEC, run=run, overrides=overrides, quant_config=quant_config, force=force,
        source=lambda: ModelSource.open(model, checkpoint, data, trust_checkpoint=trust_checkpoint),
        images=lambda source, config: source.calibration_dataset(
            config.calib_split, **({"image_ids": ids} if ids else {"limit": config.calib_images})),
        upstream=(lambda: {"mlp_recon": sha256_file(mlp)}) if mlp is not None else None, check=_fits_model)
    config, out = stage.config, stage.out
    if out.is_file() and not force:
        old = read_stage(run, STAGE)[1]
        held = _grid(old.w_bits, old.a_bits, old.calibrate.get("head_w_group", 0))
        wanted = _grid(config.w_bits, config.a_bits, config.head_w_group)
        if held != wanted:
            raise AphqError(f"{out} holds {held}, not {wanted}; "
                            "use another --run folder, or --force to replace it (later stages go stale)")
    if stage.current:
        return stage.reused()

    detector, params_before = build_calibrated(stage.source, config, stage.dataset, device, mlp_recon=mlp,
                                               progress=progress)
    return stage.save(quantized_tensors(detector, params_before), StageRecord(
        **stage.header(), calibrate=settings_record(config), mlp_recon_artifact=str(mlp.resolve()) if mlp else "",
        quant_config=stage.quant_config, quantization_map=quantization_map(detector)).to_dict())


def _grid(w_bits: int, a_bits: int, head_w_group: int) -> str:
    """What a calibration's integer grid is called: its bits, and its head weights' groups if any."""
    return f"W{w_bits}A{a_bits}" + (f" with head weights in groups of {head_w_group}" if head_w_group else "")


def _fits_model(source, config: CalibrateConfig) -> None:
    """Refuse a ``head_w_group`` the model's head layers cannot take, before the run folder is touched."""
    if config.head_w_group:
        check_head_group(build_heads(source.cfg), config.head_w_group)


def read_image_list(path: Path) -> list[int]:
    """Image ids from a text file: one integer per line; blank lines and ``#`` comments ignored."""
    path = Path(path)
    if not path.is_file():
        raise AphqError(f"image list {path} does not exist")
    ids = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        try:
            ids.append(int(line))
        except ValueError:
            raise AphqError(f"image list {path} line {n} is not an image id: {line!r}") from None
    if not ids:
        raise AphqError(f"image list {path} names no image")
    return ids


def build_calibrated(source, config: CalibrateConfig, dataset, device, mlp_recon: Path | None = None,
                     progress=None):
    """The float detector of ``source`` (after mlp-recon, if given), quantized and calibrated, in memory.

    Returns:
        ``(detector, float state dict before calibration)``.
    """
    detector = source.build(device, mlp_recon=mlp_recon)
    params_before = {k: v.clone() for k, v in detector.state_dict().items()}
    plan = detector_plan(detector, config.w_bits, config.a_bits, config.head_w_group)
    apply_plan(detector, plan)
    calibrate_model(detector, plan, source.batches(dataset, device), config, images=len(dataset), forward=_forward,
                    progress=progress)
    return detector, params_before


def _forward(detector, batch) -> None:
    with torch.no_grad():
        detector(return_loss=False, rescale=True, **batch)
