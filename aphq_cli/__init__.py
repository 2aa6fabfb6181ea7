"""aphq: post-training quantization of Swin detectors with APHQ-ViT."""

__version__ = "0.1.0"
