"""prune-channels: exact mechanics, rewrites of every op kind, options, errors, reports."""
from __future__ import annotations

import json
import re
from typing import Dict, Optional

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from fixtures import FAMILIES, build_yolov5_v6
from onnxslim_yolo import verify
from onnxslim_yolo.analysis.channels import analyze_channels
from onnxslim_yolo.pass_base import PassContext, PreconditionError, UsageError
from onnxslim_yolo.passes import _prune_lower
from onnxslim_yolo.passes.prune_channels import PruneChannels
from tests.analysis import graphs

EXACT = dict(fold_mean=False, reconstruct=False)


def run(model: onnx.ModelProto, calib: Optional[list] = None, **opts):
    return PruneChannels().run(model, PassContext(options={"prune-channels": opts}, calib_inputs=calib))


def zeroed(model: onnx.ModelProto, details: Dict) -> onnx.ModelProto:
    """The original with every removed channel zeroed at its source: producer and depthwise
    filters and biases, BN beta and mean (BN(0) = 0), InstanceNorm and group norm biases (a zero
    channel or group normalises to its bias), per-channel constants (0 + 0 = 0 * 0 = 0 / s).
    A ConvTranspose the pass mapped is zeroed in its exact 1x1 Conv + DepthToSpace form."""
    model = _prune_lower.lower(model)[0]
    a = analyze_channels(model)
    out = {n.name: n.output[0] for n in model.graph.node}
    gone = set()
    for conv, v in details["layers"].items():
        tensor = out[conv + _prune_lower.SUFFIX] if v.get("op") == "ConvTranspose" else out[conv]
        for i in set(range(v["out_channels"][0])) - set(v["kept_out"]):
            gone.add(a.group_of(tensor, i))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    nodes = {n.name: n for n in m.graph.node}
    for n in m.graph.node:  # a weight shared by two Convs (CBAM's MLP) is zeroed per Conv
        for i, t in enumerate(n.input):
            if i and t in inits and sum(t in o.input for o in m.graph.node) > 1:
                own = numpy_helper.from_array(numpy_helper.to_array(inits[t]), f"{t}@{n.name}")
                m.graph.initializer.append(own)
                inits[own.name] = m.graph.initializer[-1]
                n.input[i] = own.name

    def zero(name: str, index: int, axis: int = 0) -> None:
        arr = numpy_helper.to_array(inits[name]).copy()
        idx = [slice(None)] * arr.ndim
        idx[axis] = index
        arr[tuple(idx)] = 0
        inits[name].CopyFrom(numpy_helper.from_array(arr, name))

    for g in gone:
        for r in g.roles:
            node = nodes[r.node]
            if r.kind in ("producer", "depthwise"):
                for t in node.input[1:3]:
                    zero(t, r.index)
            elif r.kind == "bn":
                zero(node.input[2], r.index)
                zero(node.input[3], r.index)
            elif r.kind == "norm":   # InstanceNormalization of a zero channel: its bias
                zero(node.input[2], r.index)
            elif r.kind == "groupnorm":   # a zero group: its bias, one a channel or (exported) a group
                bias = numpy_helper.to_array(inits[node.input[2]])
                zero(node.input[2], r.index * len(bias) // a.channel_counts[r.tensor])
            elif r.kind == "const":   # a divisor stays: 0 / s = 0
                for t in node.input[:1] if node.op_type == "Div" else node.input:
                    if t in inits and numpy_helper.to_array(inits[t]).ndim >= 3:
                        v = numpy_helper.to_array(inits[t])
                        zero(t, r.index, axis=1 - (4 - v.ndim))
    return m


def assert_exact(model: onnx.ModelProto, pruned: onnx.ModelProto, details: Dict) -> None:
    onnx.checker.check_model(pruned, full_check=True)
    onnx.shape_inference.infer_shapes(pruned, check_type=True, strict_mode=True)
    ref = zeroed(model, details)
    for d in verify.compare_models(ref, pruned, verify.random_feeds(model, 2, 3)):
        assert d.max_abs <= 1e-4 * max(1.0, d.ref_max), d


# ------------------------------------------------------------------------- exact mechanics
HAND = {
    "concat": graphs.concat_graph,
    "split11": lambda: graphs.split_graph(11),
    "split13": lambda: graphs.split_graph(13),
    "split18": lambda: graphs.split_graph(18),
    "split18_num_outputs": lambda: graphs.split_graph(18, (4, 4), True),
    "residual_depthwise": graphs.residual_graph,
    "grouped_and_depth_multiplier": graphs.grouped_graph,
    "instancenorm_ibn": graphs.instancenorm_graph,
    "group_norm21_op": graphs.group_norm_graph,
    "group_norm13_exported_shape": lambda: graphs.group_norm_graph("shape"),
    "group_norm13_exported_const": lambda: graphs.group_norm_graph("const"),
    "group_norm18_exported_minus_one": lambda: graphs.group_norm_graph("minus_one", 18),
    "pool_resize_slice": graphs.pool_resize_graph,
    "pad13": graphs.pad_graph,
    "pad18_axes": lambda: graphs.pad_graph(18),
    "se_stack11": lambda: graphs.se_stack_graph(11),
    "se_stack13": graphs.se_stack_graph,
    "se_stack18": lambda: graphs.se_stack_graph(18),
    "expand_const": graphs.expand_graph,
    "linear_se_matmul": graphs.linear_se_graph,
    "linear_se_gemm11": lambda: graphs.linear_se_graph("gemm", 11),
    "linear_se_add": lambda: graphs.linear_se_graph("add"),
    "linear_se_add18_allowzero": lambda: graphs.linear_se_graph("add", 18),
    "shuffle11": lambda: graphs.shuffle_graph(11),
    "shuffle13_minus_one": lambda: graphs.shuffle_graph(13, minus_one=True),
    "shuffle14_merged_allowzero": lambda: graphs.shuffle_graph(14, merged=True, allowzero=True),
    "split_shuffle13": graphs.split_shuffle_graph,
    "split_shuffle11_minus_one": lambda: graphs.split_shuffle_graph(11, minus_one=True),
    "coord_attention13": graphs.coord_attention_graph,
    "coord_attention18": lambda: graphs.coord_attention_graph(18),
    "cbam13": graphs.cbam_graph,
    "cbam18": lambda: graphs.cbam_graph(18),
    "conv_transpose13_crd": graphs.conv_transpose_graph,
    "conv_transpose10_dcr_no_bias": lambda: graphs.conv_transpose_graph(bias=False, opset=10),
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_pruned_equals_original_with_removed_channels_zeroed(name):
    model = HAND[name]()
    res = run(model, ratio=0.3, round_to=1, **EXACT)
    assert res.modified
    d = res.report.details
    # the target, or short of it where every unit left would overshoot it further (tiny graphs)
    if d["mac_reduction"] < 0.3:
        m = re.match(r"target not reached: ([\d.]+)% of 30\.0% .*every unit left removes ([\d.]+)%",
                     d["notes"][0])
        assert m and abs(float(m.group(1)) - 100 * d["mac_reduction"]) < 0.2, d["notes"]
        assert float(m.group(2)) + 0.1 >= 2 * (30.0 - float(m.group(1))), d["notes"]
    assert_exact(model, res.model, d)


@pytest.mark.parametrize("opset", [10, 13])
def test_conv_transpose_kernel_equal_stride_prunes_on_both_sides_and_stays_convtranspose(opset):
    """YOLOv6's upsampling ConvTranspose (kernel 2, stride 2) loses half of its input channels
    (b's outputs) and half of its output channels; the result is a ConvTranspose again, and
    equals the original with those channels zeroed."""
    model = graphs.conv_transpose_graph(opset=opset)
    res = run(model, per_layer={"b": 0.5, "up": 0.5}, round_to=1, **EXACT)
    details = res.report.details
    assert details["layers"]["up"]["out_channels"] == [6, 3]
    assert details["layers"]["up"]["in_channels"] == [8, 4]
    assert details["layers"]["up"]["op"] == "ConvTranspose"
    assert all(0 <= i < 6 for i in details["layers"]["up"]["kept_out"])
    assert details["convtranspose_as_1x1"] == ["up"]
    ops = [n.op_type for n in res.model.graph.node]
    assert ops.count("ConvTranspose") == 1 and ops.count("DepthToSpace") == 1  # the fixture's own
    up = next(n for n in res.model.graph.node if n.op_type == "ConvTranspose")
    w = numpy_helper.to_array(next(t for t in res.model.graph.initializer if t.name == up.input[1]))
    assert w.shape == (4, 3, 2, 2)
    assert_exact(model, res.model, details)


def test_conv_transpose_refit_ties_biases_and_is_written_back():
    """With calibration data the 1x1 form of ``up`` is refit with one bias per output channel,
    so it goes back to a ConvTranspose; the refit brings the outputs closer than mean folding."""
    model = graphs.conv_transpose_graph()
    calib = verify.random_feeds(model, 3, 0)
    plain = run(model, calib, per_layer={"b": 0.5}, round_to=1, reconstruct=False)
    res = run(model, calib, per_layer={"b": 0.5}, round_to=1)
    assert "up" in res.report.details["refit"]
    assert [n.op_type for n in res.model.graph.node].count("ConvTranspose") == 1
    assert not [n for n in res.report.details["notes"] if "stays a 1x1 Conv" in n]
    feeds = verify.random_feeds(model, 2, 5)
    err = [verify.compare_models(model, m, feeds)[0].max_abs for m in (plain.model, res.model)]
    assert err[1] < err[0]


def test_conv_transpose_tied_solve_matches_a_constrained_least_squares():
    """_solve_tied against lstsq on the stacked problem with one shared bias column per channel."""
    from onnxslim_yolo.passes._prune_refit import _solve_tied
    rng = np.random.default_rng(0)
    n, f, c, blocks = 200, 5, 3, 4
    x = rng.normal(1.0, 1.0, (n, f))
    y = x @ rng.normal(size=(f, blocks * c)) + rng.normal(size=blocks * c)
    y += rng.normal(0, .1, (n, blocks * c))
    a = np.concatenate([x, np.ones((n, 1))], axis=1)
    theta = _solve_tied(a.T @ a, a.T @ y, 0.0, np.zeros((f + 1, blocks * c)), blocks)
    # unknowns: one weight column per output, one bias per channel
    big = np.zeros((n * blocks * c, f * blocks * c + c))
    for o in range(blocks * c):
        big[o * n:(o + 1) * n, o * f:(o + 1) * f] = x
        big[o * n:(o + 1) * n, f * blocks * c + o % c] = 1.0
    sol = np.linalg.lstsq(big, y.T.ravel(), rcond=None)[0]
    assert np.allclose(theta[:-1], sol[:f * blocks * c].reshape(blocks * c, f).T, atol=1e-8)
    assert np.allclose(theta[-1], np.tile(sol[f * blocks * c:], blocks), atol=1e-8)


def _reader_const(model: onnx.ModelProto, op: str, after: str) -> float:
    """The constant operand of the ``op`` node that reads the output of node ``after``."""
    outs = {n.name: n.output[0] for n in model.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == op and outs[after] in n.input)
    return float(next(inits[t] for t in node.input if t in inits))


def test_cbam_mean_and_max_over_channels_make_up_for_removed_channels():
    """Half of a's channels go. CBAM's spatial attention reads the mean and the max over the
    channels: the mean is rescaled by 4/8 and the max bounded below by 0, as if the removed
    channels were zeros (exact), or, with calibration data, by the removed channels' means."""
    from onnxslim_yolo.analysis.activations import capture
    model = graphs.cbam_graph()
    res = run(model, per_layer={"a": 0.5}, round_to=1, **EXACT)
    assert res.report.details["layers"]["a"]["out_channels"] == [8, 4]
    assert_exact(model, res.model, res.report.details)
    assert _reader_const(res.model, "Mul", "ReduceMean") == 0.5
    assert _reader_const(res.model, "Max", "ReduceMax") == 0.0
    calib = verify.random_feeds(model, 3, 0)
    res = run(model, calib, per_layer={"a": 0.5}, round_to=1, reconstruct=False)
    gone = sorted(set(range(8)) - set(res.report.details["layers"]["a"]["kept_out"]))
    xc = np.concatenate([v["ca_out"] for v in capture(model, calib, ["ca_out"])])
    means = xc.mean(axis=(0, 2, 3))[gone]
    assert _reader_const(res.model, "Max", "ReduceMax") == pytest.approx(means.max(), rel=1e-4)
    shift = _reader_const(res.model, "Add", "ReduceMean_Mul_removed")
    assert shift == pytest.approx(means.sum() / 8, rel=1e-4)


def test_conv_transpose_with_overlapping_kernel_blocks_naming_why():
    model = graphs.conv_transpose_graph(kernel=4)
    reasons = analyze_channels(model).blocked_reasons()
    assert any("ConvTranspose 'up'" in r and "kernel 4x4 is not its square stride 2x2" in r for r in reasons)
    res = run(model, ratio=0.2, round_to=1, **EXACT)
    assert "convtranspose_as_1x1" not in res.report.details
    assert [n.op_type for n in res.model.graph.node].count("ConvTranspose") == 1
    assert_exact(model, res.model, res.report.details)


@pytest.mark.parametrize("minus_one", [False, True])
@pytest.mark.parametrize("layer", ["u0.b2", "u1.b2"])
def test_pruning_through_a_channel_shuffle_is_exact(layer, minus_one):
    """Half of a branch's output channels go; through the shuffles that also takes channels of
    the other units and of the stem, and the shuffle Reshapes take the new counts."""
    model = graphs.shuffle_graph(13, minus_one)
    res = run(model, per_layer={layer: 0.5}, round_to=1, **EXACT)
    details = res.report.details
    assert details["layers"][layer]["out_channels"] == [4, 2]
    assert_exact(model, res.model, details)
    consts = {t.name: numpy_helper.to_array(t).tolist() for t in res.model.graph.initializer}
    targets = [consts[n.input[1]] for n in res.model.graph.node if n.op_type == "Reshape"]
    left = {n: v["out_channels"][1] for n, v in details["layers"].items()}
    per_unit = [left.get("a", 8) - 4 + left.get("u0.b2", 4), left.get("u1.b2", 4) * 2]
    if minus_one:
        assert targets == [[1, 2, -1, 8, 8], [1, -1, 8, 8]] * 2
    else:  # each unit's shuffle holds its first half (what was left of the one before) and its branch
        assert targets[1][1] == per_unit[0] < 8 and targets[0] == [1, 2, per_unit[0] // 2, 8, 8]
        assert targets[3] == [1, per_unit[1], 8, 8] and targets[2][2] == per_unit[1] // 2


def _half_of_the_first_branch(model):
    """Half of u0.b2's output channels pruned (exact mode): the result, checked to equal the
    original with those channels zeroed, and the Reshape targets after it."""
    res = run(model, per_layer={"u0.b2": 0.5}, round_to=1, **EXACT)
    assert res.report.details["layers"]["u0.b2"]["out_channels"] == [4, 2]
    assert_exact(model, res.model, res.report.details)
    consts = {t.name: numpy_helper.to_array(t).tolist() for t in res.model.graph.initializer}
    return res, [consts[n.input[1]] for n in res.model.graph.node if n.op_type == "Reshape"]


@pytest.mark.parametrize("minus_one", [False, True])
def test_pruning_through_a_split_shuffle_is_exact(minus_one):
    """Half of the first unit's branch goes: the second unit's split shuffle reads 6 channels,
    so its Reshapes become (3, 2, 64) and (2, 1, 3, 8, 8) and each of its Gathers gives 3."""
    _, targets = _half_of_the_first_branch(graphs.split_shuffle_graph(minus_one=minus_one))
    assert targets[2:] == [[3, 2, 64], [2, -1 if minus_one else 1, 3, 8, 8]]


@pytest.mark.parametrize("merged,allowzero", [(True, False), (False, True), (True, True)])
def test_pruning_through_a_merged_or_allowzero_shuffle_is_exact(merged, allowzero):
    """The same cut through shuffles whose middle merges H and W (1, 2, 4, 64), or whose Reshapes
    say allowzero=1: the first Reshape's group size and the last one's count shrink."""
    res, targets = _half_of_the_first_branch(graphs.shuffle_graph(14, merged=merged, allowzero=allowzero))
    left = {n: v["out_channels"][1] for n, v in res.report.details["layers"].items()}
    n0 = left.get("a", 8) - 4 + 2
    assert n0 < 8 and targets[0] == [1, 2, n0 // 2] + ([64] if merged else [8, 8])
    assert targets[1] == [1, n0, 8, 8]
    reshapes = [n for n in res.model.graph.node if n.op_type == "Reshape"]
    assert all([a.i for a in n.attribute if a.name == "allowzero"] == ([1] if allowzero else [])
               for n in reshapes)


@pytest.mark.parametrize("variant", ["matmul", "gemm", "add"])
def test_pruning_through_a_linear_excitation_branch_is_exact(variant):
    """Half of the scaled Conv's channels go: the first Linear layer loses those input rows, the
    second those output columns (and bias values), and Reshape targets that name the count take
    the new one."""
    model = graphs.linear_se_graph(variant)
    res = run(model, per_layer={"a": 0.5}, round_to=1, **EXACT)
    details = res.report.details
    assert details["layers"]["a"]["out_channels"] == [8, 4]
    assert_exact(model, res.model, details)
    nodes = {n.name: n for n in res.model.graph.node}
    consts = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    src = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    kept = details["layers"]["a"]["kept_out"]
    w1, w2 = consts[nodes["se.fc1"].input[1]], consts[nodes["se.fc2"].input[1]]
    assert "se.w1" not in consts and w1.shape == w2.shape == (4, 4)
    if variant == "gemm":  # transB: weights stored (out, in)
        assert (w1 == src["se.w1"][:, kept]).all() and (w2 == src["se.w2"][kept]).all()
        assert (consts[nodes["se.fc2"].input[2]] == src["se.b2"][kept]).all()
    else:
        assert (w1 == src["se.w1"][kept]).all() and (w2 == src["se.w2"][:, kept]).all()
    if variant == "matmul":
        assert consts[nodes["se.flat"].input[1]].tolist() == [1, 4]
        assert consts[nodes["se.view"].input[1]].tolist() == [1, 4, 1, 1]
    if variant == "add":
        assert consts[nodes["se.view"].input[1]].tolist() == [1, -1, 1, 1]
        assert (consts[nodes["se.fc2.bias"].input[1]] == src["se.b2"][kept]).all()


def with_batch(model: onnx.ModelProto, n: int) -> onnx.ModelProto:
    """The same graph with a static batch of ``n`` on its inputs and outputs (no Reshape inside)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in list(m.graph.input) + list(m.graph.output):
        vi.type.tensor_type.shape.dim[0].dim_value = n
    return m


def test_a_static_batch_prunes_the_same_channels_to_the_same_fraction():
    one = run(graphs.concat_graph(), ratio=0.3, round_to=1, **EXACT).report.details
    model = with_batch(graphs.concat_graph(), 2)
    res = run(model, ratio=0.3, round_to=1, **EXACT)
    two = res.report.details
    assert two["macs_before"] == 2 * one["macs_before"]
    assert two["mac_reduction"] == one["mac_reduction"]
    kept = [{k: v["kept_out"] for k, v in d["layers"].items()} for d in (one, two)]
    assert kept[0] == kept[1]
    assert_exact(model, res.model, two)


def test_split_and_depthwise_attributes_follow_the_kept_channels():
    res = run(graphs.split_graph(11), per_layer={"a": 0.5}, round_to=1, **EXACT)
    split = next(n for n in res.model.graph.node if n.op_type == "Split")
    sizes = [list(onnx.helper.get_attribute_value(a)) for a in split.attribute if a.name == "split"][0]
    # each part of 'a' (3 channels read by b, 5 by c) is a layer of its own: 3 -> 2, 5 -> 3
    assert sizes == [2, 3] and res.report.details["layers"]["a"]["out_channels"] == [8, 5]
    res = run(graphs.residual_graph(), ratio=0.3, round_to=1, **EXACT)
    dw = next(n for n in res.model.graph.node if n.name == "dw")
    group = [a.i for a in dw.attribute if a.name == "group"][0]
    assert group == res.report.details["layers"]["dw"]["out_channels"][1] < 8


def test_instancenorm_channels_go_with_their_scale_and_bias():
    """IBN's InstanceNormalization half of a's channels prunes as the BatchNormalization half does."""
    model = graphs.instancenorm_graph()
    res = run(model, per_layer={"a": 0.5}, round_to=1, **EXACT)
    kept = res.report.details["layers"]["a"]["kept_out"]
    first = [i for i in kept if i < 4]
    assert len(first) < 4 and len(kept) == 4
    node = next(n for n in res.model.graph.node if n.op_type == "InstanceNormalization")
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    src = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert np.array_equal(inits[node.input[1]], src["in.s"][first])
    assert np.array_equal(inits[node.input[2]], src["in.b"][first])
    assert_exact(model, res.model, res.report.details)


def test_grouped_convs_lose_whole_groups():
    """grp (group=4, two inputs and three outputs a group) and dwm (group=12, two outputs an
    input): a's channels go in pairs, grp's outputs in threes with them, dwm's in pairs with
    grp's; the group counts and weights follow, and the result equals the zeroed original."""
    model = graphs.grouped_graph()
    res = run(model, per_layer={"a": 0.5}, round_to=1, **EXACT)
    layers = res.report.details["layers"]
    kept_a = layers["a"]["kept_out"]
    assert len(kept_a) == 4 and all(i % 2 == 0 and i + 1 in kept_a for i in kept_a[::2])
    grps = [i // 2 for i in kept_a[::2]]
    assert layers["grp"]["kept_out"] == [3 * k + j for k in grps for j in range(3)]
    assert layers["dwm"]["kept_out"] == [2 * c + j for c in layers["grp"]["kept_out"] for j in range(2)]
    nodes = {n.name: n for n in res.model.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    for name, group, shape in (("grp", 2, (6, 2, 3, 3)), ("dwm", 6, (12, 1, 3, 3))):
        assert [a.i for a in nodes[name].attribute if a.name == "group"] == [group]
        assert inits[nodes[name].input[1]].shape == shape
    assert_exact(model, res.model, res.report.details)
    # calibrated: the measured choice and h's refit work across the groups too
    calib = verify.random_feeds(model, 8, 1)
    res = run(model, calib, ratio=0.3, round_to=1)
    assert res.modified and "h" in res.report.details["refit"]
    assert res.report.details["layers"]["grp"]["out_channels"][1] % 3 == 0
    verify.session(res.model).run(None, calib[0])


@pytest.mark.parametrize("cost", ["score", "lsq"])
def test_a_split_part_keeps_a_channel_even_when_its_channels_cost_least(cost):
    """The three channels of the Split's first part cost least to remove (tiny filters); taking
    four of a's eight left that part with no channels, a zero-size tensor onnxruntime's
    optimizer refused ("invalid channel count"). Every part keeps one now."""
    model = graphs.split_rejoin_graph()
    opts = dict(per_layer={"a": 0.5}, round_to=1, **EXACT)
    if cost == "lsq":
        opts.update(criterion="activation", cost="lsq")
    res = run(model, verify.random_feeds(model, 4, 0) if cost == "lsq" else None, **opts)
    split = next(n for n in res.model.graph.node if n.op_type == "Split")
    sizes = numpy_helper.to_array(next(t for t in res.model.graph.initializer if t.name == split.input[1]))
    kept = res.report.details["layers"]["a"]["kept_out"]
    assert len(kept) == 4 and len(set(kept) & {0, 1, 2}) == 1 and sizes.tolist() == [1, 3], (kept, sizes)
    verify.session(res.model, optimize=True)
    assert_exact(model, res.model, res.report.details)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("bn", [True, False])
def test_fixture_families_prune_exactly_before_and_after_bn_folding(family, bn):
    model = FAMILIES[family](bn=bn)
    res = run(model, ratio=0.2, **EXACT)
    assert res.report.details["mac_reduction"] >= 0.2
    assert res.report.counts["layers_pruned"] >= 1
    assert_exact(model, res.model, res.report.details)


@pytest.mark.parametrize("family", ["yolov8", "yolox"])
def test_activation_criterion_with_least_squares_on_calibration_data(family):
    model = FAMILIES[family](bn=family == "yolov8")
    calib = verify.random_feeds(model, 3, 0)
    res = run(model, calib, ratio=0.15, sens_images=2, samples=512, round_to=1)   # 8-wide layers
    d = res.report.details
    onnx.checker.check_model(res.model, full_check=True)
    assert d["criterion"] == "activation" and d["cost"] == "measured" and d["reconstruct"]
    assert d["mac_reduction"] >= 0.15 and d["refit"] and d["probe_runs"] > 0
    for e in d["refit"].values():
        assert e["rel_error_after"] <= e["rel_error_before"] + 1e-6
    diff = verify.compare_models(model, res.model, calib)[0]
    assert diff.cosine > 0.5


@pytest.mark.parametrize("task", ["seg", "pose", "obb", "seg-e2e", "pose-e2e", "obb-e2e"])
@pytest.mark.parametrize("bn", [True, False])
def test_segment_pose_and_obb_exports_prune_exactly_and_are_measured_on_detections(task, bn):
    """YOLOv8-seg, -pose and -obb-style exports (candidates followed by mask coefficients beside
    prototype masks, by keypoints, or by an angle), also ending in a YOLO26-style top-k
    selection: pruning is exact on the zeroed channels, and with calibration data the probe
    measures detections (with their masks, keypoints or rotated boxes), not the head maps."""
    from fixtures.postprocess import append_topk
    from fixtures.yolov8 import build_yolov8_obb, build_yolov8_pose, build_yolov8_seg
    kind = task.split("-")[0]
    classes = 1 if kind == "pose" else 3   # not 4: boxes and scores would look alike
    model = {"seg": build_yolov8_seg, "pose": build_yolov8_pose, "obb": build_yolov8_obb}[kind](
        bn=bn, num_classes=classes)
    if task.endswith("e2e"):
        model = append_topk(model, classes, corners=kind != "obb")
    res = run(model, ratio=0.2, round_to=1, **EXACT)
    assert res.report.details["mac_reduction"] >= 0.2
    assert_exact(model, res.model, res.report.details)
    calib = verify.random_feeds(model, 3, 0)
    d = run(model, calib, ratio=0.15, sens_images=2, samples=512, round_to=1).report.details
    assert d["cost"] == "measured" and d["metric"] == "detections" and d["mac_reduction"] >= 0.15


def test_row_plan_caps_the_largest_refits_at_the_largest_count_that_fits():
    from onnxslim_yolo.passes._prune_refit import MIN_ROWS, row_plan

    want, cout = {"a": 10000, "b": 3000, "c": 100000}, {"a": 10, "b": 10, "c": 10}
    assert row_plan(want, cout, 4 * 10 * 113000) == (want, None)
    rows, note = row_plan(want, cout, 4 * 10 * (10000 + 3000 + 20000))
    assert rows == {"a": 10000, "b": 3000, "c": 20000}
    assert note.startswith("refit: 1 of 3 Convs fit on 20000 sampled rows instead of up to 100000: ")
    rows, note = row_plan(want, cout, 1)
    assert rows == {"a": MIN_ROWS, "b": MIN_ROWS, "c": MIN_ROWS} and "take 0.0 GB instead of 0.0" in note


def test_refit_memory_caps_the_rows_of_the_widest_refits_only():
    """Over the budget, the refits sample one common number of rows (the narrow ones keep
    theirs): the same model as asking for that many rows, and a note says what was cut."""
    model = FAMILIES["yolov8"](bn=True, img=256)    # P3 has more positions than the capped rows
    calib = verify.random_feeds(model, 4, 0)
    common = dict(ratio=0.05, sens_images=1, samples=256, round_to=1)
    capped = run(model, calib, refit_memory=1e-9, **common)
    notes = [n for n in capped.report.details["notes"] if n.startswith("refit: ")]
    assert len(notes) == 1, capped.report.details["notes"]
    m = re.match(r"refit: (\d+) of (\d+) Convs fit on 2048 sampled rows instead of up to (\d+)", notes[0])
    assert m and 0 < int(m[1]) < int(m[2]) == len(capped.report.details["refit"]) and int(m[3]) > 2048
    same = run(model, calib, refit_samples=2048, **common)
    assert not [n for n in same.report.details["notes"] if n.startswith("refit: ")]
    a = {t.name: numpy_helper.to_array(t) for t in capped.model.graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in same.model.graph.initializer}
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    free = {t.name: numpy_helper.to_array(t) for t in run(model, calib, **common).model.graph.initializer}
    refits = [k for k in a if k.endswith("_w_refit")]
    assert refits and set(refits) <= free.keys()
    assert any(not np.array_equal(a[k], free[k]) for k in refits)     # the cap took rows away


# ----------------------------------------------------------------------------- options
def test_round_to_keeps_multiples_of_eight():
    model = build_yolov5_v6(width=16)
    res = run(model, ratio=0.3, **EXACT)
    layers = res.report.details["layers"]
    assert layers
    for name, v in layers.items():
        before, after = v["out_channels"]
        if before > 8 and after != before:
            assert after % 8 == 0 and after >= 8, (name, v)
    res1 = run(model, ratio=0.3, round_to=1, **EXACT)
    assert any(v["out_channels"][1] % 8 for v in res1.report.details["layers"].values())


def test_a_target_every_unit_overshoots_is_not_taken_and_the_note_says_why():
    g = graphs.G()
    s = g.silu(g.conv("x", 3, 16, "a"), "a.act")
    model = g.model([graphs.X], [g.conv(s, 16, 2, "h")])
    res = run(model, ratio=0.1, **EXACT)         # 8 of 16 channels would remove about half
    assert not res.modified
    note = res.report.details["notes"][0]
    assert re.fullmatch(r"target not reached: 0\.0% of 10\.0% fewer multiply-adds \(every unit left "
                        r"removes (\d+\.\d)% or more, too far past the target; "
                        r"--round-to smaller for finer units\)", note), note
    assert float(re.search(r"removes (\d+\.\d)%", note).group(1)) >= 20.0
    res1 = run(model, ratio=0.1, round_to=1, **EXACT)
    assert 0.05 <= res1.report.details["mac_reduction"] <= 0.15


def test_kept_json_lists_kept_indices_per_layer(tmp_path):
    path = tmp_path / "kept.json"
    res = run(graphs.concat_graph(), ratio=0.3, round_to=1, kept_json=str(path), **EXACT)
    doc = json.loads(path.read_text())
    assert doc["layers"] == res.report.details["layers"]
    assert doc["macs_after"] < doc["macs_before"]
    for v in doc["layers"].values():
        assert len(v["kept_out"]) == v["out_channels"][1]
        assert len(v["kept_in"]) == v["in_channels"][1]
        assert v["kept_out"] == sorted(v["kept_out"])


def test_protect_keeps_a_layer_and_per_layer_ratio_prunes_one():
    res = run(graphs.concat_graph(), ratio=0.3, round_to=1, protect=["b"], **EXACT)
    assert "b" not in res.report.details["layers"] or \
        res.report.details["layers"]["b"]["out_channels"][1] == 6
    res = run(graphs.concat_graph(), per_layer={"b": 0.5}, round_to=1, **EXACT)
    layers = res.report.details["layers"]
    assert layers["b"]["out_channels"] == [6, 3] and "a" not in layers


def test_bn_criterion_needs_batchnorm():
    res = run(FAMILIES["yolov5_v6"](bn=True), ratio=0.1, criterion="bn", **EXACT)
    assert res.report.details["criterion"] == "bn"
    with pytest.raises(PreconditionError, match="criterion 'bn' needs BatchNormalization nodes"):
        run(FAMILIES["yolov5_v6"](bn=False), ratio=0.1, criterion="bn")


def _shared_input_graph() -> onnx.ModelProto:
    """a (3 -> 16) feeds both b (3x3) and c (1x1); their Concat feeds the head Conv h."""
    g = graphs.G()
    s = g.cbs("x", 3, 16, "a", k=3)
    cat = g.node("Concat", [g.cbs(s, 16, 16, "b", k=3), g.cbs(s, 16, 16, "c")], "cat", axis=1)
    return g.model([graphs.X], [g.conv(cat, 32, 4, "h")])


def _inputs_zeroed(model: onnx.ModelProto, details: Dict) -> onnx.ModelProto:
    """The original with every Conv's removed inputs and outputs zeroed in its own weights (the
    activations here map 0 to 0, so a removed channel reads as 0 wherever it went)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {t.name: t for t in m.graph.initializer}
    for n in m.graph.node:
        v = details["layers"].get(n.name)
        if v is None:
            continue
        w = numpy_helper.to_array(inits[n.input[1]]).copy()
        b = numpy_helper.to_array(inits[n.input[2]]).copy()
        w[:, sorted(set(range(w.shape[1])) - set(v["kept_in"]))] = 0
        gone = sorted(set(range(w.shape[0])) - set(v["kept_out"]))
        w[gone], b[gone] = 0, 0
        inits[n.input[1]].CopyFrom(numpy_helper.from_array(w, n.input[1]))
        inits[n.input[2]].CopyFrom(numpy_helper.from_array(b, n.input[2]))
    return m


def _gathers(model: onnx.ModelProto) -> Dict[str, np.ndarray]:
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return {n.name: consts[n.input[1]] for n in model.graph.node if n.op_type == "Gather"}


@pytest.mark.parametrize("per_layer", [{"b__reader": 0.5}, {"a": 0.5}, {"a": 0.25, "b__reader": 0.5}])
def test_readers_drop_a_shared_inputs_channels_at_one_reader_exactly(per_layer):
    model = _shared_input_graph()
    calib = verify.random_feeds(model, 4, 0)
    res = run(model, calib, per_layer=per_layer, readers=True, cost="lsq", round_to=1, **EXACT)
    d = res.report.details
    onnx.checker.check_model(res.model, full_check=True)
    gathers = _gathers(res.model)
    kept_a = d["layers"].get("a", {}).get("kept_out", list(range(16)))
    if "b__reader" in per_layer:       # b reads a subset of a's kept channels, renumbered
        assert list(gathers) == ["b__reader"] and d["reader_gathers"] == ["b__reader"]
        assert len(gathers["b__reader"]) == len(d["layers"]["b"]["kept_in"]) < len(kept_a)
        assert [kept_a[i] for i in gathers["b__reader"]] == d["layers"]["b"]["kept_in"]
        assert "c" not in d["layers"] or d["layers"]["c"]["kept_in"] == kept_a
    else:                               # every reader reads all that is left: no Gather stays
        assert gathers == {} and "reader_gathers" not in d
        assert d["layers"]["b"]["kept_in"] == d["layers"]["c"]["kept_in"] == kept_a
    ref = _inputs_zeroed(model, d)
    for diff in verify.compare_models(ref, res.model, verify.random_feeds(model, 2, 3)):
        assert diff.max_abs <= 1e-4 * max(1.0, diff.ref_max), diff


def test_a_models_own_channel_gather_follows_the_channels_it_reads():
    model = graphs.gather_graph()
    calib = verify.random_feeds(model, 4, 0)
    res = run(model, calib, per_layer={"a": 0.5}, readers=True, cost="lsq", round_to=1, **EXACT)
    d = res.report.details
    kept_a = d["layers"]["a"]["kept_out"]
    left = [c for c in (4, 0, 5) if c in kept_a]
    assert len(kept_a) < 6 and len(left) < 3 and [kept_a[i] for i in _gathers(res.model)["pick"]] == left
    assert d["layers"]["c"]["in_channels"] == [3, len(left)]
    ref = _inputs_zeroed(model, d)
    for diff in verify.compare_models(ref, res.model, verify.random_feeds(model, 2, 3)):
        assert diff.max_abs <= 1e-4 * max(1.0, diff.ref_max), diff


def test_readers_count_a_shared_weight_slot_once_and_are_off_by_default():
    model = _shared_input_graph()
    calib = verify.random_feeds(model, 4, 0)
    res = run(model, calib, ratio=0.3, readers=True, cost="lsq", round_to=1, protect=["a"], **EXACT)
    d = res.report.details
    # a's channels are protected: what b and c lose, they lose at their own readers
    assert "a" not in d["layers"] and d["reader_gathers"]
    assert abs(d["steps"][-1]["reduction"] - d["mac_reduction"]) < 1e-3
    assert d["mac_reduction"] >= 0.3
    off = run(model, calib, ratio=0.3, cost="lsq", round_to=1, protect=["a"], **EXACT)
    assert _gathers(off.model) == {} and "reader_gathers" not in off.report.details
    # nor with the static scores (cost auto without a refit), which no reader-only group fits
    scored = run(model, calib, ratio=0.3, readers=True, round_to=1, protect=["a"], **EXACT)
    assert scored.report.details["cost"] == "score" and _gathers(scored.model) == {}
    layers = off.report.details["layers"]
    assert all(v["kept_in"] == list(range(v["in_channels"][0])) for k, v in layers.items() if k in ("b", "c"))


def test_dead_channel_is_removed_exactly():
    g = graphs.G()
    a = g.conv("x", 3, 4, "a")
    w = numpy_helper.to_array(g.inits[0]).copy()
    w[2] = 0.0  # channel 2 is the constant SiLU(bias) everywhere
    g.inits[0] = numpy_helper.from_array(w, g.inits[0].name)
    s = g.silu(a, "a.act")
    model = g.model([graphs.X], [g.conv(g.cbs(s, 4, 4, "b", k=1), 4, 2, "h")])
    calib = verify.random_feeds(model, 2, 0)
    res = run(model, calib, per_layer={"a": 0.25}, round_to=1, reconstruct=False)
    d = res.report.details
    assert d["layers"]["a"]["kept_out"] == [0, 1, 3]
    assert d["dead_removed_exact"] == 1 and res.report.counts["dead_channels"] == 1
    diff = verify.compare_models(model, res.model, verify.random_feeds(model, 2, 5))[0]
    assert diff.max_abs < 1e-5


# ------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("ratio", [0, 0.95, -1])
def test_ratio_out_of_range(ratio):
    with pytest.raises(UsageError) as e:
        run(graphs.concat_graph(), ratio=ratio)
    assert str(e.value) == (f"prune-channels: ratio {ratio} is outside (0, 0.9]: give the fraction of "
                            "multiply-adds to remove, e.g. 0.2")


def test_unknown_protected_names():
    with pytest.raises(UsageError) as e:
        run(graphs.concat_graph(), ratio=0.2, protect=["a", "missing", "nothing*"])
    assert str(e.value) == "prune-channels: protect names match no node: missing, nothing*"


def test_nothing_prunable_says_why():
    with pytest.raises(PreconditionError) as e:
        run(graphs.blocked_graph(), ratio=0.2)
    msg = str(e.value)
    assert msg.startswith("prune-channels: nothing prunable in this model: every channel group is blocked: ")
    assert "consumed by Reshape 'flat'" in msg or "graph output" in msg or "Detect head" in msg


def test_other_bad_options():
    with pytest.raises(UsageError, match="give ratio"):
        run(graphs.concat_graph())
    with pytest.raises(UsageError, match="round_to must be a positive integer, got 0"):
        run(graphs.concat_graph(), ratio=0.2, round_to=0)
    with pytest.raises(UsageError, match="criterion 'activation' needs calibration images"):
        run(graphs.concat_graph(), ratio=0.2, criterion="activation")
    with pytest.raises(UsageError, match="unknown options bogus"):
        run(graphs.concat_graph(), ratio=0.2, bogus=1)
    with pytest.raises(UsageError, match="refit_memory must be a positive number of GB, got 0.0"):
        run(graphs.concat_graph(), ratio=0.2, refit_memory=0)
    # a NaN ridge broke the refit (exit 4, 'cosine -1.0000'); a negative one ran (cosine 0.62);
    # "false" read as True, and reconstruct "no" said it needed calibration images
    for k, v in (("refit_ridge", float("nan")), ("ridge", -1.0), ("dead_tol", float("inf"))):
        with pytest.raises(UsageError, match=f"{k} must be a finite number >= 0, got"):
            run(graphs.concat_graph(), ratio=0.2, **{k: v})
    for k in ("sequential", "reconstruct", "readers"):
        with pytest.raises(UsageError, match=f"{k} must be true or false, got 'false'"):
            run(graphs.concat_graph(), ratio=0.2, **{k: "false"})


def test_registered_and_off_by_default():
    from onnxslim_yolo.registry import all_passes
    cls = all_passes()["prune-channels"]
    assert cls is PruneChannels and not cls.default_enabled and cls.numerics.value == "lossy"


# ------------------------------------------------------------------------ real models
@pytest.mark.shared
@pytest.mark.slow
@pytest.mark.parametrize("which", ["yolov5n", "yolov5n_bn"])
def test_yolov5n_pruned_by_l1_equals_the_zeroed_original(which, yolov5n_path, yolov5n_bn_path):
    from onnxslim_yolo import ir
    from onnxslim_yolo.analysis.flops import model_stats

    model = ir.load(yolov5n_path if which == "yolov5n" else yolov5n_bn_path)
    res = run(model, ratio=0.1, criterion="l1", **EXACT)
    d = res.report.details
    assert 0.1 <= d["mac_reduction"] < 0.15
    assert model_stats(res.model).macs == d["macs_after"] < model_stats(model).macs
    shrunk = {n: v for n, v in d["layers"].items() if v["out_channels"][1] < v["out_channels"][0]}
    assert shrunk
    for name, v in shrunk.items():  # multiples of 8 by default
        assert v["out_channels"][1] % 8 == 0, (name, v)
    head = [n.name for n in model.graph.node if n.name.startswith("/model.24/m.")]
    assert len(head) == 3 and not set(head) & set(shrunk), "the Detect head convs keep their outputs"
    assert_exact(model, res.model, d)


def test_sweep_cost_measures_non_decreasing_per_layer_curves(capsys, monkeypatch):
    from onnxslim_yolo import progress as shown
    monkeypatch.setattr(shown, "LINE_EVERY", 0.0)   # off a terminal: progress lines from the start
    model = FAMILIES["yolov8"](bn=True)
    calib = verify.random_feeds(model, 3, 0)
    res = run(model, calib, ratio=0.15, cost="sweep", sweep_images=2, samples=512, progress=True, round_to=1)
    d = res.report.details
    bar = re.search(r"sensitivity sweep: layers:\s+0%.*?\| 0/(\d+) ", capsys.readouterr().err)
    assert bar and int(bar.group(1)) >= len(d["curves"]) > 0    # total: the layers that can shrink
    onnx.checker.check_model(res.model, full_check=True)
    assert d["cost"] == "sweep" and d["metric"] == "agreement" and d["mac_reduction"] >= 0.15
    assert d["curves"] and d["probe_runs"] >= len(d["curves"])
    for curve in d["curves"].values():
        assert curve[0] == [0, 0.0]
        xs, ys = [p[0] for p in curve], [p[1] for p in curve]
        assert xs == sorted(set(xs)) and ys == sorted(ys)
    with pytest.raises(UsageError, match="probe_metric 'nope' is not one of auto, detections, agreement"):
        run(model, calib, ratio=0.15, probe_metric="nope")


def _half(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with its Conv weights stored as float16 (as a half=True export has them)."""
    import numpy as np

    m = onnx.ModelProto()
    m.CopyFrom(model)
    weights = {n.input[1] for n in m.graph.node if n.op_type == "Conv"}
    for i, t in enumerate(m.graph.initializer):
        if t.name in weights:
            m.graph.initializer[i].CopyFrom(numpy_helper.from_array(
                numpy_helper.to_array(t).astype(np.float16), t.name))
    return m


@pytest.mark.parametrize("which", ["prune-channels", "insert-qdq"])
def test_float16_models_are_refused_naming_the_conv(which):
    from onnxslim_yolo.passes.insert_qdq import InsertQDQ

    model = _half(build_yolov5_v6(opset=13))
    first = next(n.name for n in model.graph.node if n.op_type == "Conv")
    p = PruneChannels() if which == "prune-channels" else InsertQDQ()
    ctx = PassContext(options={which: {"ratio": 0.1} if which == "prune-channels" else {}},
                      calib_inputs=[{"images": None}])
    with pytest.raises(PreconditionError, match=rf"Conv '{first}' has float16 weights: this pass works on "
                                                r"float32 models; run the .upcast-float16. pass first"):
        p.requires(model, ctx)
    p.requires(build_yolov5_v6(opset=13), ctx)      # the float32 model passes the same check


def _input_qdq(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with a QuantizeLinear / DequantizeLinear pair on its image input, as a QDQ model
    has them."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    x = m.graph.input[0].name
    for n in m.graph.node:
        n.input[:] = ["x_dq" if i == x else i for i in n.input]
    m.graph.initializer.extend([numpy_helper.from_array(np.array(1 / 255, np.float32), "x_scale"),
                                numpy_helper.from_array(np.array(0, np.uint8), "x_zp")])
    m.graph.node.insert(0, onnx.helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]))
    m.graph.node.insert(0, onnx.helper.make_node("QuantizeLinear", [x, "x_scale", "x_zp"], ["x_q"]))
    return m


def test_quantized_models_are_refused_with_the_order_to_use():
    model = _input_qdq(build_yolov5_v6(opset=13))
    onnx.checker.check_model(model)
    ctx = PassContext(options={"prune-channels": {"ratio": 0.1}}, calib_inputs=[{"images": None}])
    with pytest.raises(PreconditionError, match=r"already holds DequantizeLinear, QuantizeLinear nodes: .*"
                                                r"prune the float model, then quantize \(--prune R --int8"):
        PruneChannels().requires(model, ctx)
    PruneChannels().requires(build_yolov5_v6(opset=13), ctx)


@pytest.mark.parametrize("progress", [True, False])
def test_selection_and_refit_show_progress_bars_when_asked(capsys, monkeypatch, progress):
    from onnxslim_yolo import progress as shown
    monkeypatch.setattr(shown, "LINE_EVERY", 0.0)   # off a terminal: progress lines from the start
    model = build_yolov5_v6(opset=13)
    res = run(model, verify.random_feeds(model, 3, 0), ratio=0.2, progress=progress)
    assert res.report.details["mac_reduction"] >= 0.2
    err = capsys.readouterr().err
    assert ("pruning: M multiply-adds removed" in err) == progress
    assert ("refitting convs" in err) == progress


def test_statistics_larger_than_free_memory_are_refused_before_they_are_collected(monkeypatch):
    """The selection's least-squares states are (F+1)^2 float64 per consumer Conv; on a machine
    without that much free memory the pass stops at once, naming the widest Conv."""
    from onnxslim_yolo.passes import _prune_cost

    model = FAMILIES["yolov8"](bn=True)
    calib = verify.random_feeds(model, 2, 0)
    seen = []
    real = _prune_cost.check_state_memory
    monkeypatch.setattr(_prune_cost, "check_state_memory",
                        lambda g, p, **kw: seen.append(real(g, p, 10 ** 12, kw.get("moments_kept", False)))
                        or seen[-1])
    run(model, calib, ratio=0.05, sens_images=1, samples=256)
    need = seen[0]
    monkeypatch.setattr(_prune_cost, "check_state_memory", real)
    monkeypatch.setattr(_prune_cost, "available_memory", lambda: need - 1)
    with pytest.raises(PreconditionError) as e:
        run(model, calib, ratio=0.05, sens_images=1, samples=256)
    msg = str(e.value)
    assert re.match(r"prune-channels: the least-squares statistics of \d+ consumer Convs need 0\.0 GB and "
                    r"0\.0 GB is free \(widest: '[^']+', 0\.00 GB\): protect the layers feeding it", msg), msg
    params = {n: (np.zeros((4, 64, 3, 3)), None) for n in ("a", "b")}
    stand_in = type("P", (), {"conv": params})()
    assert real({"a": None, "b": None}, stand_in, available=10 ** 9) == 3 * 577 ** 2 * 8
    assert real({"a": None, "b": None}, stand_in, available=10 ** 9, moments_kept=True) == 5 * 577 ** 2 * 8


@pytest.mark.parametrize("gains", [True, False])
def test_lsq_cost_with_and_without_gains_prunes_to_the_target(gains):
    """The lsq cost keeps the moment matrices for its gains only (memory counted for that)."""
    model = FAMILIES["yolov8"](bn=True)
    res = run(model, verify.random_feeds(model, 2, 0), ratio=0.1, cost="lsq", gains=gains, sens_images=1,
              round_to=1, samples=256)
    d = res.report.details
    assert d["cost"] == "lsq" and 0.1 <= d["mac_reduction"] < 0.15 and d["refit"]
    assert any(v != 1.0 for v in d["gains"].values()) == gains     # measured, or all 1 without


def test_pruning_blind_or_on_few_images_warns(caplog):
    """Without calibration the pass falls back on filter L1 with no refit (yolov5n: mAP 0.000 at
    10%) without a word; with fewer images than its probe set it said nothing either."""
    model = graphs.concat_graph()
    caplog.set_level("WARNING")
    run(model, ratio=0.2, round_to=1)
    said = [r.getMessage() for r in caplog.records]
    assert any("no calibration images, so channels are chosen by filter L1" in m for m in said), said
    caplog.clear()
    run(model, ratio=0.2, round_to=1, criterion="l1")   # asked for: no warning
    assert not [r for r in caplog.records if "calibration" in r.getMessage()]
    run(model, verify.random_feeds(model, 3, 0), ratio=0.2, round_to=1)
    assert any("3 calibration image(s), fewer than the 8" in r.getMessage() for r in caplog.records)
    caplog.clear()   # 16 images: yolov5n lost 7.1 points at 10%, twice what it loses on 64
    run(model, verify.random_feeds(model, 16, 0), ratio=0.2, round_to=1)
    assert any("16 calibration images, under half the 64" in r.getMessage() for r in caplog.records)
    caplog.clear()
    run(model, verify.random_feeds(model, 16, 0), ratio=0.2, round_to=1, calib_images=16)   # asked for
    assert not [r for r in caplog.records if "calibration" in r.getMessage()]
    run(model, verify.random_feeds(model, 16, 0), ratio=0.2, round_to=1, calib_images=40)   # not the default
    said = [r.getMessage() for r in caplog.records]
    assert any("16 calibration images, under half the 40 asked for (calib_images)" in m
               for m in said), said


def test_a_per_layer_ratio_that_rounding_moves_says_so():
    """b (6 channels) asked to lose half keeps 3 at round_to 1, as asked; asked to lose 90% at
    round_to 4 it keeps 4, the only multiple of 4 below 6: the count kept differs from the 0.6
    asked, and a note says so (a ratio of 0.9 kept 8 of 32 in silence)."""
    model = graphs.concat_graph()
    fine = run(model, per_layer={"b": 0.5}, round_to=1, **EXACT).report.details
    assert fine["layers"]["b"]["out_channels"] == [6, 3]
    assert not [n for n in fine["notes"] if n.startswith("per-layer")]
    coarse = run(model, per_layer={"b": 0.9}, round_to=4, **EXACT).report.details
    assert coarse["layers"]["b"]["out_channels"] == [6, 4]
    assert "per-layer 'b': b keeps 4 of 6 channels, the allowed count nearest the 0.6 asked" in \
        " ".join(coarse["notes"])


def test_a_branch_dead_on_every_calibration_image_is_pruned_and_refit_without_a_singular_solve():
    """A ReLU whose input is negative on every image leaves its consumer's input moments zero: the
    least-squares penalty scaled by that energy was zero too, and the selection stopped on
    'Singular matrix' (numpy's LinAlgError). Now the penalty counts such an input as energy 1."""
    g = graphs.G()
    a = g.conv("x", 3, 4, "a")
    bias = next(t for t in g.inits if t.name == "a.b")
    bias.CopyFrom(numpy_helper.from_array(np.full(4, -100.0, np.float32), "a.b"))
    b = g.cbs(g.node("Relu", [a], "a.relu"), 4, 8, "b", k=3)
    model = g.model([graphs.X], [g.conv(b, 8, 5, "h")])
    calib = verify.random_feeds(model, 4, 0)
    for cost in ("lsq", "measured"):
        res = run(model, calib, ratio=0.3, round_to=1, criterion="activation", cost=cost, reconstruct=True)
        assert res.modified and res.report.details["mac_reduction"] > 0.2, cost
        onnx.checker.check_model(res.model, full_check=True)
        assert np.all(np.isfinite(verify.run(verify.session(res.model), calib[0])[0])), cost


def test_a_model_whose_only_prunable_layer_has_no_dense_consumer_says_so_with_calibration():
    """The only layer with prunable channels is a CBAM spatial gate's one-channel Conv (its
    consumer, a broadcasting Mul, has no weights): the least-squares statistics had no Conv to
    collect for, and asking onnxruntime for a model with no outputs stopped the pass ("OrtValue
    indexes should have been populated", exit 4). Now it says there is nothing it can take."""
    g = graphs.G()
    a = g.conv("x", 3, 4, "a")
    mean = g.node("ReduceMean", [a], "mean", axes=[1], keepdims=1)
    peak = g.node("ReduceMax", [a], "max", axes=[1], keepdims=1)
    both = g.node("Concat", [mean, peak], "cat", axis=1)
    gate = g.node("Sigmoid", [g.conv(both, 2, 1, "gate", k=3)], "sig")
    model = g.model([graphs.X], [a, g.conv(g.node("Mul", [a, gate], "gated"), 4, 5, "h")])
    calib = verify.random_feeds(model, 4, 0)
    res = run(model, calib, ratio=0.2, criterion="activation", reconstruct=True)
    assert not res.modified
    assert res.report.details["notes"][0].startswith("target not reached: 0.0% of 20.0%"), res.report.details


@pytest.mark.parametrize("form", ["op21", "shape", "const"])
def test_a_group_norm_loses_whole_groups(form):
    """a's 16 channels in 4 groups of 4: a keep of 8 is two whole groups; the group count, the
    first target's G, the InstanceNormalization's per-group parameters, a constant last target
    and the affine follow; with --round-to 8 two groups go at a time; calibrated, h is refit."""
    model = graphs.group_norm_graph(form)
    res = run(model, per_layer={"a": 0.5}, round_to=1, **EXACT)
    kept = res.report.details["layers"]["a"]["kept_out"]
    groups = sorted({i // 4 for i in kept})
    assert len(kept) == 8 and kept == [4 * k + j for k in groups for j in range(4)]
    nodes = {n.name: n for n in res.model.graph.node}
    inits = {t.name: numpy_helper.to_array(t) for t in res.model.graph.initializer}
    src = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    if form == "op21":
        assert [a.i for a in nodes["gn"].attribute if a.name == "num_groups"] == [2]
        assert np.array_equal(inits[nodes["gn"].input[1]], src["gn.s"][kept])
    else:
        assert inits[nodes["gn.first"].input[1]].tolist() == [0, 2, -1]
        assert np.array_equal(inits[nodes["gn.in"].input[2]], src["gn.b"][groups])
        assert np.array_equal(inits[nodes["gn.mul"].input[1]], src["gn.affine.s"][kept])
        if form == "const":
            assert inits[nodes["gn.last"].input[1]].tolist() == [1, 8, 8, 8]
    assert_exact(model, res.model, res.report.details)
    res = run(model, ratio=0.3, round_to=8, **EXACT)
    assert res.report.details["layers"]["a"]["out_channels"] == [16, 8]
    calib = verify.random_feeds(model, 8, 1)
    res = run(model, calib, ratio=0.2, round_to=1)
    assert res.modified and "h" in res.report.details["refit"]
    assert res.report.details["layers"]["a"]["out_channels"][1] % 4 == 0
    verify.session(res.model, optimize=True).run(None, calib[0])
