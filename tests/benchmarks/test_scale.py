"""benchmarks/scale.py --merge: what an earlier run leaves in the page."""

import json
from dataclasses import asdict

from benchmarks.scale import Step, earlier_run


def step(model: str, stage: str) -> Step:
    return Step(model=model, images=2, stage=stage, argv=[stage, "--model", model], seconds=1.0, peak_rss_mib=2.0,
                run_peak_mib=0.0, run_end_mib=0.0, cache_peak_mib=0.0, cache_end_mib=0.0)


def test_merge_keeps_the_other_models_steps_and_commands(tmp_path):
    out = tmp_path / "scale.md"
    steps = [step("mask-rcnn-swin-t", "eval"), step("cascade-mask-rcnn-swin-t", "eval"),
             step("mask-rcnn-swin-t", "calibrate")]
    out.with_suffix(".json").write_text(json.dumps([asdict(s) for s in steps]))
    out.write_text("# Cost\n\n## Commands\n\n```bash\n"
                   "$ .venv/bin/python benchmarks/scale.py --models mask-rcnn-swin-t cascade-mask-rcnn-swin-t\n"
                   "$ aphq eval --model mask-rcnn-swin-t\n$ aphq eval --model cascade-mask-rcnn-swin-t\n"
                   "$ .venv/bin/python benchmarks/scale.py --disk-only\n```\n## Reading\n\nby hand\n")
    kept, commands = earlier_run(out, ["mask-rcnn-swin-t"])
    # cascade-mask-rcnn-swin-t contains the name but is another model; the disk-only line is rewritten anyway
    assert kept == [steps[1]]
    assert commands == ["$ aphq eval --model cascade-mask-rcnn-swin-t"]
    kept, commands = earlier_run(out, ["cascade-mask-rcnn-swin-s"])
    assert kept == steps and len(commands) == 3


def test_merge_without_an_earlier_run_keeps_nothing(tmp_path):
    assert earlier_run(tmp_path / "scale.md", ["mask-rcnn-swin-t"]) == ([], [])
