"""QDQ lint: pairing, scales, zero points, per-channel axes, TensorRT rules, decode tail and the
onnxruntime fusion warnings."""
from __future__ import annotations

import platform

import numpy as np
import onnx
import pytest
from onnx import TensorProto as T
from onnx import helper, numpy_helper

import fixtures
from onnxslim_yolo.check import fusion, qdq_lint, qdq_rules
from onnxslim_yolo.check.index import GraphIndex

from .models import copy, insert_qdq, node, qdq_conv, quantize_convs, set_init, tail_names

LINT = {"qdq.pairs": lambda i: qdq_lint.check_pairs(i), "qdq.scales": lambda i: qdq_lint.check_scales(i),
        "qdq.zero_points": lambda i: qdq_lint.check_zero_points(i),
        "qdq.per_channel": lambda i: qdq_rules.check_per_channel(i),
        "qdq.decode_tail": lambda i: qdq_rules.check_decode_tail(i)}
X86 = platform.machine().lower() in ("x86_64", "amd64", "i686")


@pytest.fixture(scope="module")
def yolo() -> onnx.ModelProto:
    return fixtures.build_yolov5_v6(opset=13, bn=False)


def run(name: str, model: onnx.ModelProto):
    return LINT[name](GraphIndex(model))


@pytest.mark.parametrize("act", ["uint8", "int8"])
def test_good_qdq_model_passes_every_lint(act):
    m = qdq_conv(act)
    for name in LINT:
        r = run(name, m)
        assert r.status == "pass", (name, r.message)
    assert run("qdq.per_channel", m).details == {"quantized": 1, "per_channel": 1}


def test_float_model_skips_qdq_checks(yolo):
    idx = GraphIndex(yolo)
    assert {LINT[n](idx).status for n in LINT} == {"skip"}
    assert qdq_rules.check_target_rules(idx, "tensorrt").status == "skip"
    assert fusion.check_ort_fusion(idx, "ort-cpu").status == "skip"


@pytest.mark.parametrize("value", [0.0, -0.02, np.nan, np.inf])
def test_bad_activation_scale_fails(value):
    m = set_init(qdq_conv(), "x_scale", value)
    r = run("qdq.scales", m)
    assert r.status == "fail" and "x_Q" in r.message and "x_DQ" in r.details["invalid"][1]


def test_bad_per_channel_weight_scale_fails_and_counts():
    ws = np.full(8, 0.01, np.float32)
    ws[[2, 5]] = [0.0, np.nan]
    r = run("qdq.scales", set_init(qdq_conv(), "w_scale", ws))
    assert r.status == "fail" and "w_DQ" in r.message and "1 non-finite, 1 <= 0 of 8" in r.message


def test_runtime_scale_warns():
    m = qdq_conv()
    m.graph.node.insert(0, helper.make_node("Abs", ["x_scale"], ["x_scale_rt"], name="abs"))
    for n in m.graph.node:
        if n.name in ("x_Q", "x_DQ"):
            n.input[1] = "x_scale_rt"
    assert run("qdq.scales", m).status == "warn"


def test_q_without_dq_fails():
    m = qdq_conv()
    node(m, "head/Sigmoid").input[0] = "y_q"  # Q feeds a float op directly
    node(m, "y_DQ").output[0] = "unused"
    r = run("qdq.pairs", m)
    assert r.status == "fail" and "y_Q" in r.message and "Sigmoid" in r.message


def test_q_as_graph_output_fails():
    m = qdq_conv()
    m.graph.node.append(helper.make_node("QuantizeLinear", ["out", "y_scale", "y_zp"], ["out_q"],
                                         name="out_Q"))
    m.graph.output.append(helper.make_tensor_value_info("out_q", T.UINT8, [1, 8, 8, 8]))
    r = run("qdq.pairs", m)
    assert r.status == "fail" and "out_Q" in r.message and "graph output" in r.message


def test_q_dq_pair_with_different_scale_fails():
    m = qdq_conv()
    m.graph.initializer.append(numpy_helper.from_array(np.float32(0.07), "other_scale"))
    node(m, "y_DQ").input[1] = "other_scale"
    r = run("qdq.pairs", m)
    assert r.status == "fail" and "y_Q -> y_DQ" in r.message and "differ" in r.message


def test_zero_point_out_of_range_fails():
    m = qdq_conv("int8")
    zp = next(t for t in m.graph.initializer if t.name == "x_zp")
    zp.ClearField("raw_data")
    del zp.int32_data[:]
    zp.int32_data.append(200)  # int8 stores values in int32_data: 200 is not an int8
    r = run("qdq.zero_points", m)
    assert r.status == "fail" and "200" in r.message and "[-128, 127]" in r.message


def test_4bit_types_are_named_on_every_onnx():
    """INT4/UINT4 are read by value: onnx names them in TensorProto only from 1.16 on (1.14 is supported)."""
    assert (qdq_lint.INT4, qdq_lint.UINT4) == (getattr(T, "INT4", 22), getattr(T, "UINT4", 21))
    assert qdq_lint._type_name(qdq_lint.INT4) == "int4" and qdq_lint._type_name(qdq_lint.UINT4) == "uint4"


@pytest.mark.skipif(not hasattr(T, "INT4"), reason="onnx < 1.16 cannot read 4-bit tensors")
def test_int4_zero_point_out_of_range_fails():
    m = qdq_conv("int8")
    zp = next(t for t in m.graph.initializer if t.name == "x_zp")
    zp.ClearField("raw_data")
    del zp.int32_data[:]
    zp.data_type = T.INT4
    zp.int32_data.append(9)
    r = run("qdq.zero_points", m)
    assert r.status == "fail" and "9" in r.message and "[-8, 7]" in r.message


def test_zero_point_count_must_match_scales():
    r = run("qdq.zero_points", set_init(qdq_conv(), "w_zp", np.zeros(4, np.int8)))
    assert r.status == "fail" and "4 zero points for 8 scales" in r.message


def test_tensorrt_needs_symmetric_int8():
    idx = GraphIndex(qdq_conv("uint8"))
    r = qdq_rules.check_target_rules(idx, "tensorrt")
    assert r.status == "fail" and "uint8" in r.message
    assert qdq_rules.check_target_rules(GraphIndex(qdq_conv("int8")), "ort-cpu").status == "pass"
    r = qdq_rules.check_target_rules(GraphIndex(qdq_conv("int8")), "tensorrt")
    assert r.status == "fail" and r.details["invalid"] == [
        "b_DQ: int32 DequantizeLinear (TensorRT reads int8 only; keep biases float)"]
    trt_ok = GraphIndex(qdq_conv("int8", bias_dq=False))
    assert qdq_rules.check_target_rules(trt_ok, "tensorrt").status == "pass"


def test_tensorrt_nonzero_int8_zero_point_fails():
    m = set_init(qdq_conv("int8", bias_dq=False), "y_zp", np.int8(3))
    r = qdq_rules.check_target_rules(GraphIndex(m), "tensorrt")
    assert r.status == "fail" and "zero point 3" in r.message and "y_Q" in r.message


def test_wrong_per_channel_axis_fails():
    m = qdq_conv(cout=4)  # 4 output channels = 4 input channels: axis 1 still has the right length
    node(m, "w_DQ").attribute[0].i = 1
    r = run("qdq.per_channel", m)
    assert r.status == "fail" and "axis 1, expected 0" in r.message and "conv" in r.message


def test_per_channel_scale_length_mismatch_fails():
    m = set_init(set_init(qdq_conv(), "w_scale", np.full(6, 0.01, np.float32)), "w_zp", np.zeros(6, np.int8))
    r = run("qdq.per_channel", m)
    assert r.status == "fail" and "6 values for 8 output channels" in r.message


def test_conv_transpose_weights_use_axis_1():
    m = qdq_conv(cout=6, w_axis=1)
    conv = node(m, "conv")
    conv.op_type = "ConvTranspose"
    w = np.random.default_rng(0).integers(-9, 9, (4, 6, 3, 3)).astype(np.int8)  # (Cin, Cout, kh, kw)
    m = set_init(m, "w_q", w)
    assert run("qdq.per_channel", m).status == "pass"
    node(m, "w_DQ").attribute[0].i = 0
    m = set_init(set_init(m, "w_scale", np.full(4, 0.01, np.float32)), "w_zp", np.zeros(4, np.int8))
    r = run("qdq.per_channel", m)
    assert r.status == "fail" and "axis 0, expected 1" in r.message


def test_quantized_tail_fails():
    r = run("qdq.decode_tail", qdq_conv(tail_qdq=True))
    assert r.status == "fail" and "s_Q quantizes head/Sigmoid" in r.message


def test_yolo_fixture_decode_tail(yolo):
    m = yolo
    tail = tail_names(m)
    assert len(tail) > 10 and all(n.startswith("model.24/") for n in tail)
    good = quantize_convs(m)  # Convs (including the last ones) quantized, decode tail float
    r = run("qdq.decode_tail", good)
    assert r.status == "pass" and r.details["tail_nodes"] == len(tail)
    bad = insert_qdq(good, "output")  # the decoded boxes and scores under one uint8 scale
    r = run("qdq.decode_tail", bad)
    assert r.status == "fail" and "output_Q" in r.message


def test_quantized_constant_read_by_tail_fails(yolo):
    m = yolo
    consumer = next(n for n in m.graph.node if n.name in set(tail_names(m)) and n.op_type == "Mul"
                    and any(i for i in n.input if i.startswith("model.24")))
    idx = GraphIndex(m)
    const_in = next(i for i in consumer.input if idx.is_const(i))
    m = copy(m)
    m.graph.initializer.extend([numpy_helper.from_array(np.int8(2), "k_q"),
                                numpy_helper.from_array(np.float32(1.0), "k_s")])
    m.graph.node.insert(0, helper.make_node("DequantizeLinear", ["k_q", "k_s"], ["k"], name="k_DQ"))
    node(m, consumer.name).input[list(consumer.input).index(const_in)] = "k"
    r = run("qdq.decode_tail", m)
    assert r.status == "fail" and "k_DQ feeds quantized constant" in r.message


def test_fusion_passes_when_ort_fuses_everything():
    r = fusion.check_ort_fusion(GraphIndex(qdq_conv("uint8")), "ort-cpu")
    assert r.status == "pass" and r.details["source"] == "onnxruntime optimized graph"
    assert fusion.check_ort_fusion(GraphIndex(qdq_conv("uint8")), "tensorrt").status == "skip"


@pytest.mark.skipif(not X86, reason="the S8 rule is specific to onnxruntime x86 builds")
def test_s8_conv_is_fused_only_when_each_dequantized_tensor_has_one_consumer():
    """The claim encoded in fusion.reason, checked against the installed onnxruntime: x86 has no
    S8-activation QLinearConv, and converts an int8 Q/DQ pair to uint8 only with one consumer."""
    single = fusion.check_ort_fusion(GraphIndex(qdq_conv("int8")), "ort-cpu")
    assert single.status == "pass"
    m = qdq_conv("int8")  # SiLU: the Conv output feeds both Sigmoid and Mul
    node(m, "head/Sigmoid").output[0] = "sig"
    m.graph.node.append(helper.make_node("Mul", ["y_dq", "sig"], ["out"], name="head/Mul"))
    r = fusion.check_ort_fusion(GraphIndex(m), "ort-cpu")
    assert r.status == "warn" and r.details["count"] == 1
    assert r.details["unfused"][0].startswith("conv: int8 (S8) activations")
    assert r.details["source"] == "onnxruntime optimized graph"
    u8 = qdq_conv("uint8")
    node(u8, "head/Sigmoid").output[0] = "sig"
    u8.graph.node.append(helper.make_node("Mul", ["y_dq", "sig"], ["out"], name="head/Mul"))
    assert fusion.check_ort_fusion(GraphIndex(u8), "ort-cpu").status == "pass"


def test_op_without_qlinear_kernel_warns():
    m = qdq_conv("uint8")
    # Sigmoid (which ORT fuses) -> Pow between DQ and Q, which has no quantized kernel
    m.graph.initializer.append(numpy_helper.from_array(np.float32(2.0), "two"))
    sig = node(m, "head/Sigmoid")
    sig.op_type, sig.name = "Pow", "head/Pow"
    sig.input.append("two")
    m = insert_qdq(m, "out", 0.05, 0)
    r = fusion.check_ort_fusion(GraphIndex(m), "ort-cpu")
    assert r.status == "warn"
    assert r.details["unfused"] == ["head/Pow: no quantized kernel for Pow in onnxruntime CPU"]


@pytest.mark.parametrize("mode", ["nearest", "linear"])
def test_a_resize_between_dq_and_q_of_one_range_fuses_only_in_nearest_mode(mode: str):
    """onnxruntime drops the Q/DQ around a nearest Resize; an interpolating one stays float
    between them even with equal ranges (measured here), so only that one is reported."""
    s, z = numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.uint8(128), "z")
    scales = numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_in"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_in"),
             helper.make_node("Resize", ["xd", "", "scales"], ["r"], name="up", mode=mode),
             helper.make_node("QuantizeLinear", ["r", "s", "z"], ["rq"], name="q_out"),
             helper.make_node("DequantizeLinear", ["rq", "s", "z"], ["y"], name="dq_out")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 4, 16, 16])], [s, z, scales])
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])
    r = fusion.check_ort_fusion(GraphIndex(m), "ort-cpu")
    if mode == "nearest":
        assert r.status == "pass", r.message
    else:   # onnxruntime 1.21-1.24 drops them around a linear Resize too: then it is not reported
        opt = fusion.ort_optimized(m)
        dq_out = {o for n in opt.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        in_float = any(n.op_type == "Resize" and n.input[0] in dq_out for n in opt.graph.node)
        assert r.status == ("warn" if in_float else "pass"), r.message
        assert r.details["unfused"] == (["up: no quantized kernel for an interpolating Resize in "
                                         "onnxruntime CPU"] if in_float else [])


def test_fusion_reason_for_a_float_constant_operand():
    """A Linear's bias Add between DQ and Q (YOLOv5's transformer block): onnxruntime needs both
    inputs of a QLinearAdd dequantized, and the reason names the float constant."""
    s, z = numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.uint8(128), "z")
    bias = numpy_helper.from_array(np.linspace(-0.5, 0.5, 16, dtype=np.float32), "bias")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q_in"),
             helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"], name="dq_in"),
             helper.make_node("Add", ["xd", "bias"], ["a"], name="linear/Add"),
             helper.make_node("QuantizeLinear", ["a", "s", "z"], ["aq"], name="q_out"),
             helper.make_node("DequantizeLinear", ["aq", "s", "z"], ["y"], name="dq_out")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", T.FLOAT, [1, 49, 16])],
                          [helper.make_tensor_value_info("y", T.FLOAT, [1, 49, 16])], [s, z, bias])
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])
    r = fusion.check_ort_fusion(GraphIndex(m), "ort-cpu")
    assert r.status == "warn"
    assert r.details["unfused"] == ["linear/Add: constant input 'bias' is float, not dequantized"]


def test_fusion_reason_for_float_second_input(yolo):
    r = fusion.check_ort_fusion(GraphIndex(quantize_convs(yolo)), "ort-cpu")
    # SiLU's Mul reads the dequantized Conv output and the float Sigmoid: it cannot become QLinearMul
    assert r.status == "warn"
    assert any(u.startswith("model.0/act/Mul: input") and "is float (from Sigmoid)" in u
               for u in r.details["unfused"])
    assert not any("/Conv" in u.split(":")[0] for u in r.details["unfused"])


def test_a_float_conv_reading_a_tensor_quantized_for_another_reader_is_not_reported():
    """A Conv kept float (say INT8 measured slower) whose input is quantized for an INT8 sibling
    reads a DQ output like any float op; it dequantized no weights, so nothing is lost."""
    m = qdq_conv("uint8")
    m.graph.initializer.append(numpy_helper.from_array(
        np.random.default_rng(1).normal(size=(8, 4, 1, 1)).astype(np.float32), "w_float"))
    m.graph.node.append(helper.make_node("Conv", ["x_dq", "w_float"], ["side"], name="float_conv"))
    m.graph.output.append(helper.make_tensor_value_info("side", T.FLOAT, [1, 8, 8, 8]))
    r = fusion.check_ort_fusion(GraphIndex(m), "ort-cpu")
    assert r.status == "pass", r.message
    # the same Conv with dequantized weights but no requantized output is still reported
    w = numpy_helper.from_array(np.random.default_rng(2).integers(-9, 9, (8, 4, 1, 1)).astype(np.int8), "wq2")
    m.graph.initializer.append(w)
    m.graph.node.append(helper.make_node("DequantizeLinear", ["wq2", "w_scale", "w_zp"], ["w2"],
                                         name="w2_DQ"))
    node(m, "float_conv").input[1] = "w2"
    r = fusion.check_ort_fusion(GraphIndex(m), "ort-cpu")
    assert r.status == "warn" and r.details["unfused"][0].startswith("float_conv: output is not requantized")


def test_an_op_without_kernel_is_reported_only_when_its_dq_serves_it_alone():
    """A float ConvTranspose between DQ and Q loses nothing when the dequantized tensor is read in
    INT8 by another node too (here the Conv) and its output is requantized for an INT8 reader: no
    placement does better. Read through a DQ of its own, that Q -> DQ pair is wasted."""
    m = qdq_conv("uint8")
    m.graph.initializer.append(numpy_helper.from_array(
        np.random.default_rng(3).normal(size=(4, 4, 2, 2)).astype(np.float32), "w_up"))
    m.graph.node.append(helper.make_node("ConvTranspose", ["x_dq", "w_up"], ["up"], name="up",
                                         strides=[2, 2]))
    m.graph.output.append(helper.make_tensor_value_info("up", T.FLOAT, [1, 4, 16, 16]))
    m = insert_qdq(m, "up", 0.05, 128)
    r = fusion.check_ort_fusion(GraphIndex(m), "ort-cpu")
    assert r.status == "pass", r.message
    own = copy(m)  # a pair of its own (another scale, so onnxruntime does not merge the two)
    own.graph.initializer.append(numpy_helper.from_array(np.float32(0.03), "x_scale2"))
    own.graph.node.insert(0, helper.make_node("QuantizeLinear", ["x", "x_scale2", "x_zp"], ["x_q2"],
                                              name="x_Q2"))
    own.graph.node.insert(1, helper.make_node("DequantizeLinear", ["x_q2", "x_scale2", "x_zp"], ["x_dq2"],
                                              name="x_DQ2"))
    node(own, "up").input[0] = "x_dq2"
    r = fusion.check_ort_fusion(GraphIndex(own), "ort-cpu")
    assert r.status == "warn" and r.details["unfused"] == \
        ["up: no quantized kernel for ConvTranspose in onnxruntime CPU"], r.details


def _residual_add_after_float_conv(int8_reader: bool = True) -> onnx.ModelProto:
    """ResNet's last bottleneck Conv kept float: Add(DQ(x), float Conv(x)) -> Q. x is quantized
    for the INT8 Conv anyway; with ``int8_reader`` the Add's Q feeds another INT8 Conv (the next
    block), else only a DQ to a float graph output."""
    m = qdq_conv("uint8")
    rng = np.random.default_rng(4)
    m.graph.initializer.extend([
        numpy_helper.from_array(rng.normal(size=(4, 4, 1, 1)).astype(np.float32), "w_f"),
        numpy_helper.from_array(rng.integers(-100, 100, (4, 4, 1, 1)).astype(np.int8), "w2_q"),
        numpy_helper.from_array(np.full(4, 0.01, np.float32), "w2_scale"),
        numpy_helper.from_array(np.zeros(4, np.int8), "w2_zp")])
    m.graph.node.extend([helper.make_node("Conv", ["x", "w_f"], ["f"], name="conv3_float"),
                         helper.make_node("Add", ["x_dq", "f"], ["r"], name="add")])
    out = "r"
    if int8_reader:
        m = insert_qdq(m, "r", 0.05, 128)
        m.graph.node.extend([
            helper.make_node("DequantizeLinear", ["w2_q", "w2_scale", "w2_zp"], ["w2"], name="w2_DQ", axis=0),
            helper.make_node("Conv", ["r_dq", "w2"], ["n"], name="next_conv")])
        out = "n"
    m.graph.output.append(helper.make_tensor_value_info(out, T.FLOAT, [1, 4, 8, 8]))
    return insert_qdq(m, out, 0.05, 128)


def test_a_float_add_costs_nothing_when_its_conversions_serve_int8_neighbours():
    """Its DQ'd input is read in INT8 by the Conv and its Q by the next Conv: running the Add in
    INT8 would need one more Q (on the float Conv's output), so nothing is lost. Its Q read by a
    float graph output alone is still a Q -> DQ paid for nothing."""
    r = fusion.check_ort_fusion(GraphIndex(_residual_add_after_float_conv()), "ort-cpu")
    assert r.status == "pass", r.details
    r = fusion.check_ort_fusion(GraphIndex(_residual_add_after_float_conv(int8_reader=False)), "ort-cpu")
    assert r.status == "warn" and r.details["unfused"] == \
        ["add: input 'f' is float (from Conv), not dequantized"], r.details


def test_mish_mul_is_not_reported_its_float_input_has_no_quantized_kernel():
    """Mish (x * Tanh(Softplus(x)), YOLOv4's activation) after an INT8 Conv: Softplus and Tanh run in
    float on DQ(y) anyway, and an INT8 Mul would need a Q on the Tanh output for the DQ it saves.
    SiLU's Mul with a float Sigmoid (which has a QLinear kernel) is still reported. A gate
    Sigmoid(Div(y)), as in YOLO-World's attention, comes from the Div: the Sigmoid would need a Q
    of its own to run INT8, so the Mul is not reported either."""
    def act(first: str) -> onnx.ModelProto:
        m = qdq_conv("uint8")
        sig = node(m, "head/Sigmoid")
        if first == "Softplus":
            sig.op_type, sig.name, sig.output[0] = "Softplus", "act/Softplus", "sp"
            m.graph.node.append(helper.make_node("Tanh", ["sp"], ["th"], name="act/Tanh"))
            gate = "th"
        elif first == "Div":
            m.graph.initializer.append(numpy_helper.from_array(np.float32(2.0), "two"))
            m.graph.node.append(helper.make_node("Div", [sig.input[0], "two"], ["dv"], name="act/Div"))
            sig.input[0], sig.name, sig.output[0], gate = "dv", "act/Sigmoid", "sg", "sg"
        else:
            sig.name, sig.output[0], gate = "act/Sigmoid", "sg", "sg"
        m.graph.node.append(helper.make_node("Mul", ["y_dq", gate], ["out"], name="act/Mul"))
        return insert_qdq(m, "out", 0.05, 128)
    mish = fusion.check_ort_fusion(GraphIndex(act("Softplus")), "ort-cpu")
    assert mish.status == "pass", mish.details
    gated = fusion.check_ort_fusion(GraphIndex(act("Div")), "ort-cpu")
    assert gated.status == "pass" and gated.details["source"] == "onnxruntime optimized graph", gated.details
    silu = fusion.check_ort_fusion(GraphIndex(act("Sigmoid")), "ort-cpu")
    unfused = silu.details["unfused"]
    assert any(u.startswith("act/Mul: input 'sg' is float (from Sigmoid)") for u in unfused), silu.details


def test_uint8_activations_times_full_range_int8_weights_warn_on_a_cpu_that_saturates(monkeypatch):
    """onnxruntime's u8 x s8 kernels without VNNI sum pairs of products in 16 bits: weights past
    7 bits (|w| > 64) saturate there. qdq.target passed such a model (yolov5n quantized by
    onnxruntime's tool: -8.9 mAP on this AVX2 CPU, -1.1 with 7-bit weights) with 'accepts these types'."""
    from onnxslim_yolo.quant import targets

    wide = GraphIndex(qdq_conv("uint8"))   # weights up to +-100
    for saturates, status in ((True, "warn"), (False, "pass")):
        monkeypatch.setattr(targets, "x86_int8_saturates", lambda s=saturates: s)
        for target in ("ort-cpu", "openvino"):
            r = qdq_rules.check_target_rules(wide, target)
            assert r.status == status and r.details["saturating"] == ["conv"]
            said = "1 layers multiply uint8 activations by int8 weights beyond 7 bits (conv)"
            assert r.message.startswith(said) if saturates else "this CPU has VNNI" in r.message
    w = numpy_helper.to_array(next(t for t in qdq_conv("uint8").graph.initializer if t.name == "w_q"))
    seven = set_init(qdq_conv("uint8"), "w_q", np.clip(w, -64, 64))
    monkeypatch.setattr(targets, "x86_int8_saturates", lambda: True)
    r = qdq_rules.check_target_rules(GraphIndex(seven), "ort-cpu")
    assert r.status == "pass" and "saturating" not in r.details


def test_fusion_is_not_judged_on_a_model_onnxruntime_cannot_load():
    """It warned of '238 INT8 groups onnxruntime did not fuse' on a model onnxruntime does not load
    (runtime.runs says why)."""
    m = qdq_conv()
    next(n for n in m.graph.node if n.op_type == "Sigmoid").op_type = "NoSuchOp"
    r = fusion.check_ort_fusion(GraphIndex(m), "ort-cpu")
    assert r.status == "skip" and r.message.startswith("onnxruntime cannot load the model: ")


def test_per_channel_skips_weights_in_qoperator_form():
    """onnxruntime's QOperator output (60 per-channel QLinearConvs) passed as '0 quantized Conv
    weights (0 per-channel) have the right axis', as if none were quantized."""
    m = qdq_conv()
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    conv.op_type = "QLinearConv"   # read, not run: the check only counts
    r = qdq_rules.check_per_channel(GraphIndex(m))
    assert r.status == "skip" and r.message.startswith("1 weight layers in QOperator form")
