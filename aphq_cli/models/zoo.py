"""Named models, config resolution and building detectors from configs.

A model is given either by a built-in name (a config shipped in
``aphq_cli/models/configs``) or by the path of any mmdetection 2.x config.
Configs that use a ``SwinTransformer`` backbone, in the published project's
argument names or in mmdetection's, are rewritten to our quantizable
:class:`~aphq_cli.models.swin.APHQSwinTransformer`.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from mmcv import Config, ConfigDict
from mmdet.models import build_detector, build_head
from torch import nn

import aphq_cli.models.swin  # noqa: F401  registers APHQSwinTransformer with mmdet
from aphq_cli.data.synth import ensure_dataset
from aphq_cli.errors import AphqError
from aphq_cli.models.checkpoint import load_checkpoint

CONFIG_DIR = Path(__file__).parent / "configs"
WEIGHTS_DIR = Path(__file__).parent / "weights"


@dataclass(frozen=True)
class ModelSpec:
    """A built-in model.

    Attributes:
        name: what users type after ``--model``.
        config: the shipped mmdetection config file.
        weights: bundled weights (the testbed models), or None when the user
            supplies ``--checkpoint``.
    """

    name: str
    config: Path
    weights: Path | None = None


def builtin_models() -> dict[str, ModelSpec]:
    """Every config in the package directory, by file stem; bundled weights when shipped."""
    specs = {}
    for path in sorted(CONFIG_DIR.glob("*.py")):
        weights = WEIGHTS_DIR / f"{path.stem}.safetensors"
        specs[path.stem] = ModelSpec(path.stem, path, weights if weights.is_file() else None)
    return specs


def resolve_model(model: str) -> ModelSpec:
    """A built-in name or a config path -> :class:`ModelSpec`."""
    specs = builtin_models()
    if model in specs:
        return specs[model]
    path = Path(model)
    if path.suffix == ".py" or path.exists():
        if not path.is_file():
            raise AphqError(f"model config {path} does not exist")
        return ModelSpec(path.stem, path)
    raise AphqError(f"unknown model {model!r}; use one of {', '.join(specs)} or the path of an "
                    "mmdetection config file")


def load_config(spec: ModelSpec):
    """Parse the config and make its backbone ours.

    Returns:
        ``mmcv.Config``.
    """
    try:
        cfg = Config.fromfile(str(spec.config))
    except Exception as err:  # mmcv raises many types for a bad file
        raise AphqError(f"model config {spec.config} could not be read ({err})") from err
    if "model" not in cfg:
        raise AphqError(f"model config {spec.config} defines no `model`")
    cfg.model.backbone = ConfigDict(normalize_backbone(cfg.model.get("backbone", {})))
    # Weights come from the checkpoint; never fetch pretrained backbones.
    cfg.model.pop("pretrained", None)
    cfg.model.backbone.pop("init_cfg", None)
    return cfg


# mmdetection SwinTransformer argument -> published argument
_MMDET_SWIN_ARGS = {
    "embed_dims": "embed_dim",
    "use_abs_pos_embed": "ape",
    "with_cp": "use_checkpoint",
    "patch_size": "patch_size",
    "in_channels": "in_chans",
}
_DROPPED_SWIN_ARGS = {"convert_weights", "init_cfg", "pretrained", "strides", "act_cfg",
                      "norm_cfg", "patch_norm_cfg"}


def normalize_backbone(backbone: dict) -> dict:
    """Rewrite a ``SwinTransformer`` backbone config into ours; leave others alone."""
    backbone = copy.deepcopy(dict(backbone))
    if backbone.get("type") not in ("SwinTransformer", "APHQSwinTransformer"):
        return backbone
    out = {"type": "APHQSwinTransformer"}
    for key, value in backbone.items():
        if key == "type" or key in _DROPPED_SWIN_ARGS:
            continue
        out[_MMDET_SWIN_ARGS.get(key, key)] = value
    if isinstance(out.get("pretrain_img_size"), (tuple, list)):
        out["pretrain_img_size"] = out["pretrain_img_size"][0]
    if "strides" in backbone and tuple(backbone["strides"]) != (4, 2, 2, 2):
        raise AphqError(f"Swin backbone strides {backbone['strides']} are not supported (only 4, 2, 2, 2)")
    return out


def build_model(cfg):
    """Build the detector of ``cfg`` in eval mode on CPU, with random weights."""
    with _config_errors():
        model = build_detector(cfg.model)
    model.cfg = cfg
    return model.eval()


def build_heads(cfg) -> nn.Module:
    """The RPN and RoI heads of ``cfg``'s detector alone (random weights), named as in the detector.

    For checks of the head layers' sizes before a stage starts: the backbone,
    most of a full-size model's build time and memory, is not built.
    """
    with _config_errors():
        return nn.ModuleDict({key: build_head(copy.deepcopy(cfg.model[key])) for key in ("rpn_head", "roi_head")
                              if cfg.model.get(key)})


@contextlib.contextmanager
def _config_errors() -> Iterator[None]:
    """mmdetection's errors for a config it cannot build, as one sentence."""
    try:
        yield
    except (KeyError, TypeError, ValueError) as err:
        raise AphqError(f"model config could not be built ({err})") from err


def load_model(model: str | ModelSpec, checkpoint: Path | None = None, *, trust_pickle: bool = False,
               device="cpu", cfg=None):
    """Build a named or configured model and load its weights.

    Args:
        model: built-in name, config path, or an already resolved spec.
        checkpoint: weights to load; defaults to the bundled weights of a
            testbed model. Required for every other model.
        trust_pickle: see :func:`aphq_cli.models.checkpoint.read_state_dict`.
        device: torch device.
        cfg: the already loaded config of ``model``, to skip parsing it again.

    Returns:
        ``(detector, config, checkpoint path)``.
    """
    spec = model if isinstance(model, ModelSpec) else resolve_model(model)
    if checkpoint is None:
        if spec.weights is None:
            raise AphqError(f"model {spec.name} has no bundled weights; pass --checkpoint PATH")
        checkpoint = spec.weights
    cfg = cfg if cfg is not None else load_config(spec)
    detector = build_model(cfg)
    load_checkpoint(detector, Path(checkpoint), trust_pickle=trust_pickle)
    return detector.to(device), cfg, Path(checkpoint)


def default_data_dir(cfg) -> Path | None:
    """The synthetic testbed's folder, generated on first use, for testbed configs.

    Testbed configs set ``aphq_testbed = True``; for every other model the
    config's own ``data_root`` stands unless ``--data`` is given.
    """
    if not cfg.get("aphq_testbed", False):
        return None
    return ensure_dataset()
