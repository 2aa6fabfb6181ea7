"""Typed header records: a malformed header is one sentence; older layouts read and write back unchanged."""

import pytest

from aphq_cli.errors import AphqError
from aphq_cli.headers import ExportRecord, StageRecord

CALIBRATED = {"model": "tiny-mask-rcnn", "checkpoint": "/c.safetensors", "data": "", "image_ids": [1, 2],
              "calib_split": "train", "calibrate": {"w_bits": 4, "a_bits": 3, "calib_split": "train"},
              "mlp_recon_artifact": "", "quant_config": ""}


def test_a_header_without_the_newer_keys_reads_and_writes_back_the_same():
    record = StageRecord.from_dict(CALIBRATED, "a.safetensors", quantized=True)
    assert (record.w_bits, record.a_bits, record.quantization_map) == (4, 3, None)
    assert record.to_dict() == CALIBRATED


def test_keys_of_another_version_are_kept():
    data = dict(CALIBRATED, future_field={"x": 1})
    assert StageRecord.from_dict(data, "a.safetensors").to_dict() == data


@pytest.mark.parametrize("change, fragment", [
    ({"image_ids": "all"}, "'image_ids' is str"),
    ({"image_ids": [1, "2"]}, "'image_ids' is list"),
    ({"model": None}, "lacks 'model'"),
    ({"calibrate": {"w_bits": "4", "a_bits": 4}}, "'calibrate.w_bits' is str"),
    ({"calibrate": {"w_bits": True, "a_bits": 4}}, "'calibrate.w_bits' is bool"),
    ({"losses": [0.5, "x"]}, "'losses' is list"),
])
def test_a_field_of_the_wrong_type_is_one_sentence(change, fragment):
    data = {k: v for k, v in (CALIBRATED | change).items() if v is not None}
    with pytest.raises(AphqError, match="a.safetensors has a malformed aphq header") as err:
        StageRecord.from_dict(data, "a.safetensors", quantized=True)
    assert fragment in str(err.value) and "rerun the stage" in str(err.value)


def test_a_config_that_is_not_a_table():
    with pytest.raises(AphqError, match="its config is list, not a table"):
        StageRecord.from_dict([1], "a.safetensors")


def test_protocol_names_each_stage_when_they_differ():
    record = StageRecord.from_dict(CALIBRATED | {"reconstruct": {"calib_split": "val"}}, "a")
    assert record.protocol == "calibrate train, reconstruct val"
    assert StageRecord.from_dict(CALIBRATED, "a").protocol == "train"
    legacy = {k: v for k, v in CALIBRATED.items() if k not in ("calibrate", "calib_split")}
    assert StageRecord.from_dict(legacy, "a").protocol == "train"


def test_an_export_record_needs_its_bits_and_manifest():
    with pytest.raises(AphqError, match="lacks 'manifest'"):
        ExportRecord.from_dict({"export_format": 2, "model": "m", "data": "", "w_bits": 4, "a_bits": 4,
                                "relu_mlp_blocks": [], "mmdet_config": {}}, "e.safetensors")
