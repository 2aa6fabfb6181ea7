"""aphq: post-training quantization of Swin detectors with APHQ-ViT."""

from aphq_cli.mmcv_ext import serve as _serve_mmcv_ops

__version__ = "0.1.0"

# Before mmcv's ops are first imported: they then use aphq's served functions (torchvision's
# kernels with mmcv's semantics), so mmcv-full needs no compiled ops (aphq_cli/mmcv_ext.py).
_serve_mmcv_ops()
