"""torchrun with the gloo backend: 2 processes give the single-process metrics and APH estimates."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from aphq_cli.distributed import gather_in_order, interleave, my_indices, rank_world
from aphq_cli.tensorcache import TensorCache


def test_interleave_undoes_the_round_robin_split():
    items = list(range(7))
    # mmdetection's unshuffled DistributedSampler: pad to equal shares with the first items, then rank::world.
    padded = items + items[:2]
    parts = [padded[r::3] for r in range(3)]
    assert interleave(parts, len(items)) == items


def test_single_process_helpers_are_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    assert rank_world() == (0, 1)
    assert list(my_indices(5)) == [0, 1, 2, 3, 4]
    assert gather_in_order(["a", "b"], 2) == ["a", "b"]


def _torchrun(args, env, timeout=600):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "aphq_cli", *args]
    # Two ranks share the two cores: one thread each, or they slow each other down.
    env = dict(env, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_process_eval_equals_one_process(synth_dir, tmp_path):
    from stages.eval import evaluate

    single = evaluate(data=synth_dir, limit=5)  # 5 images: the second rank's share is padded
    out = tmp_path / "two.json"
    proc = _torchrun(["eval", "--data", str(synth_dir), "--limit", "5", "--json", str(out)], dict(os.environ))
    two = json.loads(out.read_text())
    assert {k: two[k] for k in single.metrics} == single.metrics
    assert single.metrics["bbox_AP"] > 0  # the bundled weights find the shapes: the comparison is not 0 == 0
    assert proc.stdout.count(str(out)) == 1  # rank 0 alone prints


def test_two_process_aph_equals_one_process(synth_dir, random_tiny_checkpoint, tmp_path):
    from stages.calibrate import calibrate
    from aphq_cli.models.plan import units_of
    from aphq_cli.runs import load_stage

    run = tmp_path / "one"
    calibrate(model="tiny-mask-rcnn", run=run, checkpoint=random_tiny_checkpoint, data=synth_dir, calib_images=1,
              settings={"eq_n": 16, "matmul_eq_n": 4, "search_round": 1, "max_windows": 8})
    twin = shutil.copytree(run, tmp_path / "two")
    args = ["--loss", "aph", "--iters", "2", "--images", "3", "--heads", "--keep-aph-cache"]  # the heads too (#18)
    env = dict(os.environ, APHQ_CACHE=str(tmp_path / "cache-two"))
    # "-r": torchrun would take "--run" for a prefix of its own "--run-path".
    _torchrun(["reconstruct", "-r", str(twin), *args], env)

    # The reference runs with the same single thread per process: APH is a difference of two gradients, so
    # with random weights (a nearly flat loss) it is dominated by rounding, which the thread count changes.
    one_env = dict(os.environ, APHQ_CACHE=str(tmp_path / "cache-one"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "aphq_cli", "reconstruct", "-r", str(run), *args], env=one_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (twin / "reconstruct.safetensors").is_file()
    one_dirs = sorted((tmp_path / "cache-one" / "aph").glob("[!.]*"))  # not the entries' ".<key>.users" locks
    two_dirs = sorted((tmp_path / "cache-two" / "aph").glob("[!.]*"))
    assert [d.name for d in one_dirs] == [d.name for d in two_dirs] and len(one_dirs) == 1
    one, two = TensorCache(one_dirs[0]), TensorCache(two_dirs[0])
    detector, _, _ = load_stage(run, "calibrate")
    names = [n for n, _ in units_of(detector) if n != "neck"]
    for name in names:
        assert one.complete(name, 3) and two.complete(name, 3)
        for i in range(3):
            a, b = one.get(name, i)["aph"], two.get(name, i)["aph"]
            # Same arithmetic per image whichever process computes it: equal to the bit.
            assert torch.equal(a, b), (name, i)
    # The unit caches were filled by both ranks, the optimization ran on rank 0: the same model comes out.
    from aphq_cli.artifacts import load_artifact

    got, _ = load_artifact(twin / "reconstruct.safetensors")
    want, _ = load_artifact(run / "reconstruct.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture
def one_rank_group(tmp_path):
    """A real gloo process group of one rank, as torchrun would leave joined; left by the test or here."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield dist
    if dist.is_initialized():
        dist.destroy_process_group()


def _main(monkeypatch, *argv):
    """``aphq ARGV`` in this process; its exit code. What main() changes for the process is put back."""
    from aphq_cli import cli

    monkeypatch.setattr(sys, "argv", ["aphq", *argv])
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(signal, "signal", lambda signum, handler: None)  # pytest keeps its SIGTERM handling
    with pytest.raises(SystemExit) as done:
        cli.main()
    return done.value.code


def test_a_command_that_succeeds_leaves_the_process_group(one_rank_group, monkeypatch):
    # A rank that exits inside the group can abort in gloo's threads (SIGABRT) after its work is done.
    assert _main(monkeypatch, "models") == 0
    assert not one_rank_group.is_initialized()


def test_a_command_that_fails_does_not_wait_for_the_other_ranks(one_rank_group, monkeypatch, tmp_path):
    # A barrier after an error would hang the ranks that did not fail; torchrun stops them instead.
    assert _main(monkeypatch, "status", str(tmp_path / "no-such-run")) != 0
    assert one_rank_group.is_initialized()
