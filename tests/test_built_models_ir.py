"""Models the tool builds itself to run in onnxruntime (conv timing units, the opset probe) carry
the lowest IR version their opset needs, not the installed onnx's newest: onnxruntime 1.23 (the last
with Python 3.10 wheels, installed beside onnx 1.23 there) reads up to IR 11, and refused them."""
from __future__ import annotations

import onnx
import pytest

from onnxslim_yolo import ir, verify
from onnxslim_yolo.check import structure
from onnxslim_yolo.pass_base import VerificationError
from onnxslim_yolo.quant import cost

OLD_ORT_MAX_IR = 11   # onnxruntime 1.22 and 1.23


@pytest.fixture
def old_onnxruntime(monkeypatch):
    """verify.session as onnxruntime 1.23 behaves: a model above IR 11 does not load."""
    real = verify.session

    def session(model, *args, **kwargs):
        if model.ir_version > OLD_ORT_MAX_IR:
            raise VerificationError(f"onnxruntime cannot load the model: Unsupported model IR version: "
                                    f"{model.ir_version}, max supported IR version: {OLD_ORT_MAX_IR}")
        return real(model, *args, **kwargs)

    monkeypatch.setattr(verify, "session", session)


def test_conv_timing_units_load_in_an_onnxruntime_reading_ir_11(old_onnxruntime):
    key = cost.ConvKey(8, 8, (8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1, "silu")
    for int8 in (True, False):
        assert cost._unit_model(key, int8).ir_version == 7   # opset 13 needs IR 7
    measured = cost.measure([key], budget_ms=1)
    assert measured[key].int8_ms > 0 and measured[key].float_ms > 0


def test_opset_probe_loads_in_an_onnxruntime_reading_ir_11(old_onnxruntime):
    probe = structure.runtime_loads_opset.__wrapped__
    assert probe(13) and probe(21) and not probe(99)


def test_lowest_ir_version():
    assert ir.lowest_ir_version([onnx.helper.make_opsetid("", 13)]) == 7
    assert ir.lowest_ir_version([onnx.helper.make_opsetid("", 21)]) == 10
    assert ir.lowest_ir_version([onnx.helper.make_opsetid("", 999)]) == onnx.IR_VERSION
