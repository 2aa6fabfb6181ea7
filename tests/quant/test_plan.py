"""Quantization plans and maps on hand-made modules: no Swin, no mmdetection."""

import subprocess
import sys

import pytest
from torch import nn

from aphq_cli.quant.modules import QuantConv2d, QuantLinear, QuantMatMul
from aphq_cli.quant.plan import LayerPlan, QuantPlan
from aphq_cli.quant.wrap import apply_plan, plan_from_map, quantization_map


class Product(nn.Module):
    def forward(self, a, b):
        return a @ b


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 4)
        self.mm = Product()


PLAN = QuantPlan({"conv": LayerPlan("conv", 3, 8), "fc": LayerPlan("linear", 4, 5),
                  "mm": LayerPlan("matmul", 0, 6, heads=2)})


def test_apply_plan_builds_each_layer_with_its_bits_and_shares_the_weights():
    model = Toy()
    weight = model.fc.weight
    apply_plan(model, PLAN)
    assert isinstance(model.conv, QuantConv2d) and isinstance(model.fc, QuantLinear)
    assert isinstance(model.mm, QuantMatMul)
    assert model.fc.weight is weight
    assert (model.conv.w_quant.bits, model.conv.a_quant.bits) == (3, 8)
    assert (model.fc.w_quant.bits, model.fc.a_quant.bits) == (4, 5)
    assert model.mm.a_quant.bits == model.mm.b_quant.bits == 6
    assert model.mm.a_quant.scale.shape == (1, 2, 1, 1)


def test_the_map_of_a_quantized_model_gives_back_its_plan():
    model = apply_plan(Toy(), PLAN)
    qmap = quantization_map(model)
    assert qmap == {"conv": {"kind": "conv", "w_bits": 3, "a_bits": 8},
                    "fc": {"kind": "linear", "w_bits": 4, "a_bits": 5},
                    "mm": {"kind": "matmul", "w_bits": 0, "a_bits": 6, "heads": 2}}
    assert plan_from_map(qmap, {"conv", "fc", "mm"}).layers == PLAN.layers
    rebuilt = apply_plan(Toy(), plan_from_map(qmap))
    assert quantization_map(rebuilt) == qmap


@pytest.mark.parametrize("qmap, message", [
    ({}, "missing or empty"),
    ({"fc": {"kind": "lstm", "w_bits": 4, "a_bits": 4}}, "not a layer"),
    ({"fc": {"kind": "linear", "w_bits": 9, "a_bits": 4}}, "impossible bits"),
    ({"fc": {"kind": "linear", "w_bits": "4", "a_bits": 4}}, "impossible bits"),
    ({"mm": {"kind": "matmul", "w_bits": 4, "a_bits": 4, "heads": 2}}, "impossible bits"),
    ({"mm": {"kind": "matmul", "w_bits": 0, "a_bits": 4, "heads": 0}}, "heads"),
    ({"fc": {"kind": "linear", "w_bits": 4, "a_bits": 4}}, "does not fit the model (it lacks conv)"),
])
def test_a_map_that_cannot_be_this_models_is_refused(qmap, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        plan_from_map(qmap, {"conv", "fc"} if "fit" in message else None)


def test_quantization_code_imports_without_models_or_mmdetection():
    code = ("import sys; import aphq_cli.quant.wrap, aphq_cli.quant.calib, aphq_cli.quant.aph, "
            "aphq_cli.quant.adaround, aphq_cli.quant.packing; "
            "bad = [m for m in sys.modules if m.startswith(('mmdet', 'mmcv', 'aphq_cli.models'))]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_plan_with_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown layer kind"):
        apply_plan(Toy(), QuantPlan({"fc": LayerPlan("lstm", 4, 4)}))


def test_grouped_weights_go_into_the_map_and_come_back():
    plan = QuantPlan({"conv": LayerPlan("conv", 4, 4, w_group=9), "fc": LayerPlan("linear", 4, 4, w_group=2),
                      "mm": LayerPlan("matmul", 0, 4)})
    model = apply_plan(Toy(), plan)
    assert model.conv.w_quant.scale.shape == (4, 3, 1)  # 3 inputs x 3 x 3 kernel = 27, in groups of 9
    assert model.fc.w_quant.scale.shape == (4, 2, 1)
    qmap = quantization_map(model)
    assert qmap["fc"] == {"kind": "linear", "w_bits": 4, "a_bits": 4, "w_group": 2}
    assert plan_from_map(qmap).layers == plan.layers
    assert "w_group" not in quantization_map(apply_plan(Toy(), PLAN))["fc"]  # ungrouped maps read as before


@pytest.mark.parametrize("entry", [
    {"kind": "linear", "w_bits": 4, "a_bits": 4, "w_group": -2},
    {"kind": "linear", "w_bits": 4, "a_bits": 4, "w_group": True},
    {"kind": "linear", "w_bits": 4, "a_bits": 4, "w_group": "32"},
    {"kind": "matmul", "w_bits": 0, "a_bits": 4, "heads": 2, "w_group": 4},
])
def test_a_map_with_an_impossible_weight_group_is_refused(entry):
    with pytest.raises(ValueError, match="weight group"):
        plan_from_map({"fc": entry})


def test_a_weight_group_that_does_not_divide_the_inputs_is_refused():
    with pytest.raises(ValueError, match="a weight group of 3 does not divide the layer's 4 inputs"):
        apply_plan(Toy(), QuantPlan({"fc": LayerPlan("linear", 4, 4, w_group=3)}))
