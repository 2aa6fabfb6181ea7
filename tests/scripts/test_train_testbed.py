"""The training script's snapshots: a resumed run continues exactly where it stopped."""

import importlib.util
from argparse import Namespace
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_testbed.py"


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("train_testbed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setup():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2)


def _steps(model, optim, batches):
    for x in batches:
        optim.zero_grad()
        model(x).pow(2).mean().backward()
        optim.step()


def test_resume_matches_an_uninterrupted_run(train, tmp_path):
    batches = [torch.randn(16, 4, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    args = Namespace(model="m", iters=6)
    model, optim = _setup()
    _steps(model, optim, batches)

    first, first_optim = _setup()
    _steps(first, first_optim, batches[:3])
    snap = tmp_path / "m.snapshot.pt"
    train.save_snapshot(snap, args, 3, first, first_optim, [{"iter": 3}], 12.5)
    assert not list(tmp_path.glob("*.tmp"))

    resumed, resumed_optim = _setup()  # fresh weights and Adam moments, as after a restart
    step, history, seconds = train.resume_from(snap, args, resumed, resumed_optim)
    assert (step, history, seconds) == (3, [{"iter": 3}], 12.5)
    _steps(resumed, resumed_optim, batches[3:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)  # Adam's moments came back too, not only the weights


@pytest.mark.parametrize("change, message", [({"model": "other"}, "snapshot of m"),
                                             ({"iters": 9}, "6-iteration schedule")])
def test_resume_refuses_another_model_or_schedule(train, tmp_path, change, message):
    model, optim = _setup()
    snap = tmp_path / "m.snapshot.pt"
    train.save_snapshot(snap, Namespace(model="m", iters=6), 2, model, optim, [], 1.0)
    with pytest.raises(SystemExit, match=message):
        train.resume_from(snap, Namespace(**{"model": "m", "iters": 6} | change), *_setup())


@pytest.mark.parametrize("name, stages", [("tiny-mask-rcnn", 1), ("tiny-cascade-mask-rcnn", 3)])
def test_rcnn_samples_reach_every_roi_head_stage(train, name, stages):
    from aphq_cli.models.zoo import build_model, load_config, resolve_model

    cfg = load_config(resolve_model(name))
    train.set_rcnn_samples(cfg, 256)
    model = build_model(cfg)
    samplers = getattr(model.roi_head, "bbox_sampler")
    samplers = samplers if isinstance(samplers, list) else [samplers]
    assert [s.num for s in samplers] == [256] * stages


def test_spec_changes_the_named_fields_only(train):
    from aphq_cli.data.synth import SynthSpec

    spec = train.spec_with(["max_object_frac=1.0", "max_objects=5", "image_sizes=224,256"])
    assert spec == SynthSpec(max_object_frac=1.0, max_objects=5, image_sizes=(224, 256))
    assert spec.key() != SynthSpec().key()  # another cache folder, recorded with the weights
    assert train.spec_with([]) == SynthSpec()


@pytest.mark.parametrize("change, message", [
    ("max_object_frac", "expected FIELD=VALUE"),
    ("colour=red", "expected FIELD=VALUE with FIELD one of seed,"),
    ("max_objects=2.5", "'2.5' is not an integer"),
    ("image_sizes=224x256", "is not a comma-separated list of integers"),
    ("max_object_frac=1.5", "--spec: SynthSpec needs 0 < min_object_frac <= max_object_frac <= 1"),
])
def test_spec_refuses_what_it_cannot_apply(train, change, message):
    with pytest.raises(SystemExit, match=message):
        train.spec_with([change])


def test_a_later_init_overrides_an_earlier_one_and_each_is_recorded(train, tmp_path):
    from safetensors.torch import save_file

    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    save_file({"0.weight": torch.ones(3, 2), "1.weight": torch.ones(1, 3)}, first)
    save_file({"1.weight": torch.full((1, 3), 2.0), "1.bias": torch.zeros(7)}, second)  # bias: wrong shape
    (second.with_suffix(".json")).write_text('{"command": "made by hand"}')
    inits = [train.init_provenance(p, train.init_from(model, p)) for p in (first, second)]
    assert torch.equal(model[0].weight, torch.ones(3, 2)) and torch.equal(model[1].weight, torch.full((1, 3), 2.0))
    assert [i["tensors_reused"] for i in inits] == [2, 1]
    assert inits[0]["record"] is None and inits[1]["record"] == {"command": "made by hand"}
    assert len(inits[0]["sha256"]) == 64 and inits[0]["sha256"] != inits[1]["sha256"]


def test_the_record_takes_every_argument_as_json(train):
    import json

    args = Namespace(init=[Path("a.safetensors"), Path("b")], out=Path("o"), spec=["max_objects=5"], lr=1e-3,
                     resume=None)
    assert json.loads(json.dumps(train.plain_args(args))) == {
        "init": ["a.safetensors", "b"], "out": "o", "spec": ["max_objects=5"], "lr": 1e-3, "resume": None}
