"""benchmarks/scale.py --merge: what an earlier run leaves in the page."""

import json
from dataclasses import asdict

from benchmarks.scale import Step, earlier_run, schedule_table


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


def test_a_model_not_rehearsed_is_priced_from_its_twin_and_says_so():
    plan = {"images": 2, "unit_cache": {"peak_bytes": 2 * 2**30}}
    chain = [Step(model="mask-rcnn-swin-t", images=images, stage="reconstruct", argv=[], seconds=100.0 * images,
                  peak_rss_mib=1.0, run_peak_mib=0.0, run_end_mib=0.0, cache_peak_mib=0.0, cache_end_mib=0.0,
                  phases={"unit 1/2 backbone.patch_embed": {"n": 2, "rate": 2.0},
                          "APH backbone.patch_embed": {"n": images, "rate": 0.5}, "disk_plan": plan})
             for images in (2, 4)]
    rows = [line for line in schedule_table(chain) if line.startswith("| ") and "stage" not in line]
    # The 4-image chain prices both: 20000 iterations at 2/s, 256 images at 0.5/s, and the rest of its
    # 400 s (391 s, less the 1 s of training and 8 s of APH measured) x 256 / 4.
    assert rows == ["| mask-rcnn-swin-t | reconstruct | 2.8 h | 8.5 min | 7.0 h | 9.9 h | unit_cache 256.0 GiB |",
                    "| cascade-mask-rcnn-swin-t (as mask-rcnn-swin-t: the same units) | reconstruct | 2.8 h | "
                    "8.5 min | 7.0 h | 9.9 h | unit_cache 256.0 GiB |"]
