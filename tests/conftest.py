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


@pytest.fixture(scope="session")
def bundled_fp40():
    """The bundled tiny-mask-rcnn's float metrics on the first 40 synthetic val images (evaluated once)."""
    from stages.eval import evaluate

    return evaluate(model="tiny-mask-rcnn", limit=40).metrics


def kill_when_done(code: str, folder, count: int, env=None, timeout: float = 240) -> int:
    """Run ``python -c code``, SIGKILL it once ``folder`` holds ``count`` .safetensors files.

    Returns:
        How many files were there after the kill.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", code], env=env or dict(os.environ),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while time.time() < deadline and len(list(folder.glob("*.safetensors"))) < count and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return len(list(folder.glob("*.safetensors")))
