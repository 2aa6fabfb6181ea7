"""benchmarks/scale.py: what --merge keeps of an earlier run, the published schedule's pricing, the FLOP count."""

import json
from dataclasses import asdict

from benchmarks.scale import Step, coco_data, earlier_run, schedule_table, unit_flops


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


def test_merge_of_some_image_counts_keeps_the_model_s_other_chains(tmp_path):
    out = tmp_path / "scale.md"
    two, four = (Step(**{**asdict(step("mask-rcnn-swin-t", "calibrate")), "images": n}) for n in (2, 4))
    out.with_suffix(".json").write_text(json.dumps([asdict(two), asdict(four)]))
    out.write_text("# Cost\n\n## Commands\n\n```bash\n"
                   "$ .venv/bin/python benchmarks/scale.py --models mask-rcnn-swin-t --images 2 4\n"
                   "$ aphq eval --model mask-rcnn-swin-t --checkpoint /w/mask-rcnn-swin-t.pth\n"
                   "$ aphq calibrate --model mask-rcnn-swin-t --run /w/mask-rcnn-swin-t-n2/run\n"
                   "$ aphq calibrate --model mask-rcnn-swin-t --run /w/mask-rcnn-swin-t-n4/run\n```\n")
    kept, commands = earlier_run(out, ["mask-rcnn-swin-t"], {4})
    # The 2-image chain stays with the commands that made it; the 4-image chain's stage is measured again.
    assert kept == [two]
    assert commands == ["$ .venv/bin/python benchmarks/scale.py --models mask-rcnn-swin-t --images 2 4",
                        "$ aphq eval --model mask-rcnn-swin-t --checkpoint /w/mask-rcnn-swin-t.pth",
                        "$ aphq calibrate --model mask-rcnn-swin-t --run /w/mask-rcnn-swin-t-n2/run"]


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


def test_a_data_folder_with_too_few_images_is_made_again(tmp_path):
    """A folder left by a run with fewer --images would make the stages quietly use fewer."""
    def count(folder, split):
        return len(json.loads((folder / "annotations" / f"instances_{split}2017.json").read_text())["images"])

    folder = coco_data(tmp_path / "coco", (96, 96), 1, 1)
    assert (count(folder, "train"), count(folder, "val")) == (1, 1)
    assert coco_data(tmp_path / "coco", (96, 96), 1, 1) == folder and count(folder, "train") == 1
    coco_data(tmp_path / "coco", (96, 96), 3, 1)
    assert count(folder, "train") == 3 and len(list((folder / "train2017").iterdir())) == 3


def test_a_units_flops_are_the_hand_count():
    """#19's GPU arithmetic: a Swin-T block's MLP at 320x224 (80x56 tokens of dim 96), counted by hand.

    fc1 (d -> 4d) and fc2 (4d -> d) each take 2 T 4d^2 FLOPs forward; backward
    computes both weight gradients and fc2's input gradient (the MLP's own
    input needs none): 16 + 8 + 8 + 8 = 40 T d^2.
    """
    found = unit_flops("mask-rcnn-swin-t", (320, 224))
    tokens, dim = 80 * 56, 96
    block = found["backbone.layers.0.blocks.0"]
    assert block["mlp"] == 40 * tokens * dim ** 2
    # The block adds at least qkv and proj (d -> 3d, d -> d) forward and their weight gradients: 16 T d^2.
    assert block["unit"] > block["mlp"] + 16 * tokens * dim ** 2
    assert "mlp" not in found["neck"] and found["neck"]["unit"] > 0
