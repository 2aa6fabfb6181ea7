"""Record mmcv's compiled nms and RoIAlign on seeded inputs: the golden outputs tests/test_mmcv_ops.py checks.

Run once, with an mmcv-full that has its compiled ops (the served functions
are bypassed: the compiled extension is called directly)::

    python scripts/record_mmcv_ops.py tests/fixtures/mmcv_ops.safetensors

The inputs cover what detection meets: tied scores, zero-area and inverted
boxes, boxes past the image border, RoIs of several images, RoIs smaller
than a bin, both sampling ratios the configs use and the spatial scale of
every FPN level.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
from pathlib import Path

import mmcv
import torch
from safetensors.torch import save_file


def compiled_ext():
    spec = importlib.machinery.PathFinder.find_spec("_ext", list(mmcv.__path__))
    if spec is None:
        raise SystemExit("this mmcv-full has no compiled ops: record the golden outputs with one that has")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def boxes_and_scores(gen: torch.Generator, n: int, decimals: int) -> tuple[torch.Tensor, torch.Tensor]:
    xy = torch.rand(n, 2, generator=gen) * 300 - 20  # some past the border
    wh = torch.rand(n, 2, generator=gen) * 80
    wh[: n // 20] = 0  # zero-area boxes
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[n // 20: n // 10] = boxes[n // 20: n // 10][:, [2, 3, 0, 1]]  # inverted
    scores = (torch.rand(n, generator=gen) * 10 ** decimals).round() / 10 ** decimals  # ties
    return boxes, scores


def rois_for(gen: torch.Generator, n: int, images: int) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=gen) * 250 - 10
    wh = torch.rand(n, 2, generator=gen) * 120
    wh[: n // 10] *= 0.01  # smaller than a bin
    return torch.cat([torch.randint(0, images, (n, 1), generator=gen).float(), xy, xy + wh], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    out = ap.parse_args().out
    ext = compiled_ext()
    gen = torch.Generator().manual_seed(0)
    golden: dict[str, torch.Tensor] = {}
    for case, (n, decimals) in enumerate([(300, 1), (1000, 2), (2000, 3), (1, 1)]):
        boxes, scores = boxes_and_scores(gen, n, decimals)
        golden[f"nms{case}.boxes"], golden[f"nms{case}.scores"] = boxes, scores
        for thr in (0.5, 0.7):
            golden[f"nms{case}.keep@{thr}"] = ext.nms(boxes, scores, iou_threshold=thr, offset=0)
    feats = torch.randn(2, 4, 48, 64, generator=gen)
    rois = rois_for(gen, 64, 2)
    golden["roi.feats"], golden["roi.rois"] = feats, rois
    # The box heads' 7x7 at every level's scale; the mask heads' 14x14 at one.
    cases = [(scale, ratio, (7, 7)) for scale in (1 / 4, 1 / 8, 1 / 16, 1 / 32) for ratio in (0, 2)]
    for scale, ratio, size in cases + [(1 / 4, 0, (14, 14)), (1 / 8, 2, (14, 14))]:
        key = f"roi@{scale}/{ratio}/{size[0]}"
        output = feats.new_zeros(len(rois), feats.shape[1], *size)
        empty = feats.new_zeros(0)
        ext.roi_align_forward(feats, rois, output, empty, empty, aligned_height=size[0], aligned_width=size[1],
                              spatial_scale=scale, sampling_ratio=ratio, pool_mode=1, aligned=True)
        grad_out = torch.randn(output.shape, generator=gen)
        grad_in = torch.zeros_like(feats)
        ext.roi_align_backward(grad_out, rois, empty, empty, grad_in, aligned_height=size[0], aligned_width=size[1],
                               spatial_scale=scale, sampling_ratio=ratio, pool_mode=1, aligned=True)
        golden[f"{key}.out"], golden[f"{key}.grad_out"], golden[f"{key}.grad_in"] = output, grad_out, grad_in
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in golden.items()}, str(out),
              metadata={"mmcv": mmcv.__version__, "torch": torch.__version__})
    print(out, f"{out.stat().st_size / 2**20:.2f} MiB")


if __name__ == "__main__":
    main()
