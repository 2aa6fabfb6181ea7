"""Shared fixtures: a small synthetic COCO folder and a random-weight testbed checkpoint."""

import pytest
import torch

from aphq_cli.data.synth import SynthSpec, generate


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """A 4-train / 6-val image synthetic dataset, generated once per session."""
    return generate(tmp_path_factory.mktemp("synth") / "data", SynthSpec(num_train=4, num_val=6))


@pytest.fixture(scope="session")
def random_tiny_checkpoint(tmp_path_factory):
    """tiny-mask-rcnn with seeded random weights, as safetensors."""
    from aphq_cli.models.checkpoint import save_checkpoint
    from aphq_cli.models.zoo import build_model, load_config, resolve_model

    torch.manual_seed(0)
    model = build_model(load_config(resolve_model("tiny-mask-rcnn")))
    return save_checkpoint(model, tmp_path_factory.mktemp("ckpt") / "tiny-random.safetensors")
