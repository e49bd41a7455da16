"""Channel groups on small hand-built graphs: exact membership, roles, MACs, blocking reasons."""
from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxslim_yolo.analysis.channels import analyze_channels
from onnxslim_yolo.pass_base import UsageError

from . import graphs


def _group(a, tensor: str, index: int):
    g = a.group_of(tensor, index)
    assert g is not None, (tensor, index)
    return g


def _roles(g):
    return sorted((r.kind, r.node, r.index) for r in g.roles)


def test_concat_offsets_map_inputs_to_the_concatenated_channels():
    a = analyze_channels(graphs.concat_graph())
    g = _group(a, "b_out", 2)
    assert g.channels == {("b_out", 2), ("b.act.sig_out", 2), ("b.act_out", 2), ("cat_out", 6)}
    assert _roles(g) == [("consumer", "c", 6), ("producer", "b", 2)]
    # producer b: 3 in x 3x3 x 64 px; consumer c: 8 out x 3x3 x 64 px
    assert g.macs == 3 * 9 * 64 + 8 * 9 * 64
    assert _group(a, "a_out", 3) is _group(a, "cat_out", 3)
    assert len(a.clusters()) == 3  # a, b, c


@pytest.mark.parametrize("opset,sizes,num_outputs", [(11, (3, 5), False), (13, (3, 5), False),
                                                     (18, (3, 5), False), (18, (4, 4), True)])
def test_split_offsets(opset, sizes, num_outputs):
    a = analyze_channels(graphs.split_graph(opset, sizes, num_outputs))
    first = sizes[0]
    g = _group(a, "a_out", first + 1)
    assert ("split_out1", 1) in g.channels and ("split_out0", 1) not in g.channels
    assert _roles(g) == [("consumer", "c", 1), ("producer", "a", first + 1)]
    assert _roles(_group(a, "a_out", 0)) == [("consumer", "b", 0), ("producer", "a", 0)]


def test_residual_add_and_depthwise_couple_everything_on_the_channel():
    a = analyze_channels(graphs.residual_graph())
    g = _group(a, "a_out", 5)
    assert {("add_out", 5), ("b_out", 5), ("dw_out", 5), ("dw.act_out", 5)} <= g.channels
    assert _roles(g) == [("consumer", "b", 5), ("consumer", "h", 5), ("depthwise", "dw", 5),
                         ("producer", "a", 5), ("producer", "b", 5)]
    assert len(a.prunable_groups()) == 8
    assert len(a.clusters()) == 1


def test_maxpool_resize_pass_channels_and_slice_shifts_them():
    a = analyze_channels(graphs.pool_resize_graph())
    g = _group(a, "a_out", 4)
    assert {("pool_out", 4), ("up_out", 4)} <= g.channels
    assert _roles(g) == [("consumer", "b", 4), ("producer", "a", 4)]
    assert _roles(_group(a, "b_out", 3)) == [("consumer", "h", 2), ("producer", "b", 3)]
    # channels the Slice drops are produced and read by nobody: prunable, no consumer
    cut = _group(a, "b_out", 0)
    assert cut.prunable and _roles(cut) == [("producer", "b", 0)]


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_spatial_pad_passes_channels_and_a_channel_pad_blocks(opset):
    a = analyze_channels(graphs.pad_graph(opset))
    g = _group(a, "a_out", 2)
    assert ("pad_out", 2) in g.channels
    assert _roles(g) == [("consumer", "b", 2), ("producer", "a", 2)]
    assert {("pad2_out", 7), ("pool_out", 7)} <= _group(a, "b_out", 7).channels
    assert len(a.prunable_groups()) == 14
    blocked = analyze_channels(graphs.pad_graph(opset, channel_pad=True))
    assert "consumed by Pad 'pad' (pads the batch or channel axis)" in _group(blocked, "a_out", 2).reasons
    assert len(blocked.prunable_groups()) == 8


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_se_mean_and_stacked_sum_keep_the_channel_axis(opset):
    """The SE block's spatial ReduceMean and the Unsqueeze / Concat / ReduceSum of a stacked
    weighted sum leave channel c at axis 1: a, b and the SE expand conv share each channel."""
    a = analyze_channels(graphs.se_stack_graph(opset))
    g = _group(a, "a_out", 3)
    assert {("se.mean_out", 3), ("se2_out", 3), ("ua_out", 3), ("stack_out", 3), ("fuse.sum_out", 3),
            ("b_out", 3)} <= g.channels
    assert _roles(g) == [("consumer", "h", 3), ("consumer", "se1", 3), ("producer", "a", 3),
                         ("producer", "b", 3), ("producer", "se2", 3)]
    assert len(a.prunable_groups()) == 12
    # a mean over the channels alone (CBAM's spatial attention) reads any count: not blocked
    # (the rewrite rescales it); over the channels and a spatial axis: blocked
    over_c = analyze_channels(graphs.se_stack_graph(opset, mean_over=(1,)))
    g = _group(over_c, "a_out", 3)
    assert g.prunable and ("se.mean_out", 0) not in g.channels
    assert len(over_c.prunable_groups()) == 12
    over_ch = analyze_channels(graphs.se_stack_graph(opset, mean_over=(1, 2)))
    assert "consumed by ReduceMean 'se.mean' (moves or reduces the channel axis)" in \
        _group(over_ch, "a_out", 3).reasons
    assert len(over_ch.prunable_groups()) == 4


@pytest.mark.parametrize("opset,merged,allowzero", [(13, False, False), (13, True, False), (14, False, True)])
def test_channel_shuffle_maps_each_group_position_and_couples_the_groups(opset, merged, allowzero):
    """Shuffle of 2 groups of 4: Concat channel a*4 + b is shuffled channel b*2 + a, and channel
    b of both halves goes together (the Reshapes keep equal groups). The same with H and W
    merged in the middle (a rank-4 shuffle) and with allowzero=1 on the Reshapes."""
    a = analyze_channels(graphs.shuffle_graph(opset, merged=merged, allowzero=allowzero))
    for b in range(4):
        g = _group(a, "u0.cat_out", b)
        assert {("u0.cat_out", 4 + b), ("u0.shuffle_out", 2 * b), ("u0.shuffle_out", 2 * b + 1)} <= g.channels
        assert g.prunable
    # channel 0 of the first unit's branch rides along with stem channel 0 and, through the second
    # shuffle, with channels 0 and 1 of the second unit's branch
    assert _roles(_group(a, "u0.b2_out", 0)) == [
        ("consumer", "h", 0), ("consumer", "h", 1), ("consumer", "h", 2), ("consumer", "h", 3),
        ("producer", "a", 0), ("producer", "u0.b2", 0), ("producer", "u1.b2", 0), ("producer", "u1.b2", 1)]
    # the rank-5 tensors between the Reshapes are no channel positions of any Conv
    assert not any(t.startswith(("u0.view", "u0.swap")) for g in a.prunable_groups() for t, _ in g.channels)


@pytest.mark.parametrize("minus_one", [False, True])
def test_split_shuffle_maps_even_channels_to_one_output_and_odd_ones_to_the_other(minus_one):
    """Megvii's ShuffleNetV2 split (FastestDet, YOLO-FastestV2): stem channel 2k is channel k of
    the Gather 0 output, 2k + 1 channel k of the Gather 1 output, and the pair is one channel.
    Before, the Reshape blocked every channel of the stem and of both units."""
    a = analyze_channels(graphs.split_shuffle_graph(minus_one=minus_one))
    for k in range(4):
        g = _group(a, "a_out", 2 * k)
        assert {("a_out", 2 * k + 1), ("u0.even_out", k), ("u0.odd_out", k)} <= g.channels
        assert g.prunable
    # channel k of the first unit's branch is concatenated after the 4 passed on (channel 4 + k),
    # and reaches the second unit's Gather 0 or 1 as channel (4 + k) // 2
    g = _group(a, "u0.b2_out", 1)
    assert {("u0.cat_out", 5), ("u1.odd_out", 2), ("u0.cat_out", 4)} <= g.channels
    assert g.prunable and len(a.prunable_groups()) > 8
    # the rank-3 and rank-5 tensors between the Reshapes are no channel positions of any Conv
    assert not any(t.startswith(("u0.view", "u0.swap", "u0.split_out")) for g in a.prunable_groups()
                   for t, _ in g.channels)


@pytest.mark.parametrize("opset", [13, 18])
def test_coordinate_attention_keeps_channels_through_its_spatial_permutes(opset):
    """Transposes (0, 1, 3, 2), a Concat and a Split on H: channel c of a is channel c of both
    pooled maps, is read by m, and is produced again by both gates, which scale a's channel c."""
    a = analyze_channels(graphs.coord_attention_graph(opset))
    g = _group(a, "a_out", 3)
    assert g.prunable
    assert {("perm_w_out", 3), ("cat_out", 3), ("scale_w_out", 3)} <= g.channels
    assert _roles(g) == [("consumer", "h", 3), ("consumer", "m", 3), ("producer", "a", 3),
                         ("producer", "gh", 3), ("producer", "gw", 3)]
    mid = _group(a, "m_out", 1)
    assert mid.prunable and {("split_out0", 1), ("perm_back_out", 1)} <= mid.channels
    assert _roles(mid) == [("consumer", "gh", 1), ("consumer", "gw", 1), ("producer", "m", 1)]


@pytest.mark.parametrize("opset", [10, 13])
def test_depth_to_space_and_space_to_depth_tie_each_channel_to_its_block(opset):
    """SpaceToDepth 2 turns channel c of d into channels t*4 + c; DepthToSpace 2 takes channels
    c*4 + t of e in CRD order (opset 13 here), t*4 + c in DCR (opset 10) into channel c."""
    a = analyze_channels(graphs.conv_transpose_graph(opset=opset))
    for c in range(4):
        g = _group(a, "d_out", c)
        assert {("s2d_out", t * 4 + c) for t in range(4)} <= g.channels
        assert _roles(g) == [("consumer", "e", t * 4 + c) for t in range(4)] + [("producer", "d", c)]
        deep = [c * 4 + t if opset >= 11 else t * 4 + c for t in range(4)]
        g = _group(a, "d2s_out", c)
        assert g.prunable and {("e_out", i) for i in deep} | {("cat2_out", 8 + c)} <= g.channels
        assert sorted(r.index for r in g.producers) == sorted(deep)


@pytest.mark.parametrize("variant,opset", [("matmul", 13), ("gemm", 13), ("add", 13), ("add", 18)])
def test_a_linear_excitation_gate_couples_the_pooled_and_the_scaled_channels(variant, opset):
    a = analyze_channels(graphs.linear_se_graph(variant, opset))
    g = a.group_of("a.act_out", 3)
    assert g.prunable and {("se.pool_out", 3), ("se.view_out", 3), ("se.scale_out", 3)} <= g.channels
    assert [r.node for r in g.producers] == ["a"] and [r.node for r in g.consumers] == ["h"]


def test_a_linear_gate_whose_flattened_tensor_has_another_reader_blocks():
    model = graphs.linear_se_graph("matmul")
    model.graph.node.append(helper.make_node("Relu", ["se.flat_out"], ["side"], name="side"))
    model.graph.output.append(helper.make_tensor_value_info("side", TensorProto.FLOAT, [1, 8]))
    g = analyze_channels(model).group_of("a.act_out", 0)
    assert g.reasons == ("consumed by Reshape 'se.flat'", "produced by Reshape 'se.view'")


def test_expand_passes_channels_when_its_target_follows_them():
    g = analyze_channels(graphs.expand_graph("const")).group_of("a.act_out", 0)
    assert g.prunable and ("expand_out", 0) in g.channels
    blocked = analyze_channels(graphs.expand_graph("other"))
    assert blocked.group_of("a.act_out", 0).reasons == ("consumed by Expand 'expand' (target shape computed)",
                                                        "produced by Expand 'expand' (target shape computed)")
    assert blocked.group_of("b.act_out", 0).reasons == (
        "channel count read by Shape 'shape_b' feeding Expand 'expand'",)


def test_a_transpose_other_than_a_shuffle_blocks():
    model = graphs.shuffle_graph(13)
    swap = next(n for n in model.graph.node if n.name == "u1.swap")
    swap.attribute[0].ints[:] = [0, 1, 2, 4, 3]  # swaps height and width instead
    a = analyze_channels(model)
    assert _group(a, "u1.cat_out", 0).reasons == ("consumed by Reshape 'u1.view'",)
    assert _group(a, "u1.shuffle_out", 0).reasons == ("produced by Reshape 'u1.shuffle'",)
    # the first shuffle still maps, so what it couples to u1's input is blocked with it
    assert _group(a, "u0.b2_out", 0).reasons == ("consumed by Reshape 'u1.view'",)
    assert _group(a, "u0.b1_out", 0).prunable


def test_unmapped_ops_block_with_reasons_and_a_grouped_conv_ties_each_group():
    a = analyze_channels(graphs.blocked_graph(), protect_head=False)
    assert not a.prunable_groups()
    assert "consumed by Reshape 'flat'" in _group(a, "a_out", 0).reasons
    # grp (group=2, 4 -> 4): group 0 is inputs 0-1 and outputs 0-1, one channel to prune
    first = _group(a, "p_out", 1)
    assert {(t, i) for t, i in first.channels if t in ("p_out", "grp_out")} == \
        {("p_out", 0), ("p_out", 1), ("grp_out", 0), ("grp_out", 1)}
    assert first.reasons == ("graph output 'grp_out'",)
    assert [r.index for r in first.of_kind("depthwise")] == [0, 1]
    assert _group(a, "p_out", 2) is not first and _group(a, "p_out", 2) is _group(a, "grp_out", 3)
    assert "graph input 'x'" in _group(a, "x", 0).reasons


def test_protect_by_name_and_pattern_and_unknown_names():
    a = analyze_channels(graphs.concat_graph(), protect=["a", "[c]"])
    assert "protected: Conv 'a'" in _group(a, "a_out", 0).reasons
    assert "protected: Conv 'c'" in _group(a, "c_out", 0).reasons
    assert _group(a, "b_out", 0).prunable
    with pytest.raises(UsageError, match=r"^prune-channels: protect names match no node: nope, zz\*$"):
        analyze_channels(graphs.concat_graph(), protect=["a", "nope", "zz*"])


def test_head_convs_are_protected():
    a = analyze_channels(graphs.concat_graph())
    assert any(r.startswith("Detect head") for r in _group(a, "h_out", 0).reasons)


def test_per_channel_and_spatial_constants_ride_along_with_the_channel():
    g = graphs.G()
    a = g.cbs("x", 3, 4, "a")
    s = g.node("Mul", [a, g.const("scale", np.ones((1, 4, 1, 1), np.float32))], "scale")
    t = g.node("Add", [a, g.const("plane", np.ones((4, 8, 8), np.float32))], "plane")
    out = g.node("Add", [g.conv(s, 4, 4, "b"), g.conv(t, 4, 4, "c")], "sum")
    an = analyze_channels(g.model([graphs.X], [g.conv(out, 4, 2, "h")]))
    grp = an.group_of("a_out", 1)
    assert {("scale_out", 1), ("plane_out", 1)} <= grp.channels
    assert _roles(grp) == [("const", "plane", 1), ("const", "scale", 1), ("consumer", "b", 1),
                           ("consumer", "c", 1), ("producer", "a", 1)]
    expected = [("consumer", "h", 3), ("producer", "b", 3), ("producer", "c", 3)]
    assert _roles(an.group_of("sum_out", 3)) == expected


def test_shape_feeding_its_own_resize_does_not_block():
    g = graphs.G()
    a = g.cbs("x", 3, 4, "a")
    shp = g.node("Shape", [a], "shape")
    bounds = [g.const("s0", np.array([0], np.int64)), g.const("s1", np.array([2], np.int64))]
    nc = g.node("Slice", [shp] + bounds, "nc")
    sizes = g.node("Concat", [nc, g.const("hw", np.array([16, 16], np.int64))], "sizes", axis=0)
    up = g.node("Resize", [a, "", "", sizes], "up", mode="nearest")
    an = analyze_channels(g.model([graphs.X], [g.conv(up, 4, 2, "h")]))
    assert an.group_of("a_out", 2).prunable
    # the same Shape feeding a Reshape of another tensor blocks
    g2 = graphs.G()
    a = g2.cbs("x", 3, 4, "a")
    r = g2.node("Reshape", [g2.cbs("x", 3, 4, "b"), g2.node("Shape", [a], "shape")], "r")
    an2 = analyze_channels(g2.model([graphs.X], [g2.conv(r, 4, 2, "h"), g2.conv(a, 4, 2, "h2")]))
    assert "channel count read by Shape 'shape' feeding Reshape 'r'" in an2.group_of("a_out", 0).reasons


@pytest.mark.parametrize("read, blocks", [
    ("gather 2", False), ("gather -1", False), ("gather 0 2 3", False), ("slice 2 4", False),
    ("slice -2 4", False), ("slice 0 4 2", False), ("end 1", False), ("start 2", False),
    ("start -2", False), ("slice 3 0 -1", True), ("slice 3 1 -1", False),
    ("gather 1", True), ("gather -3", True), ("slice 0 2", True), ("slice 1 4 2", True),
    ("end -1", True)])
def test_a_shape_read_for_other_dims_than_the_channels_does_not_block(read, blocks):
    """``_, _, h, w = x.shape`` (YOLOv8/11's anchors with a dynamic batch: Shape -> Gather 2 and 3
    -> Range) reads no channel count, whatever the values then size; reading entry 1 blocks."""
    g = graphs.G(15)   # Shape's start and end
    a = g.cbs("x", 3, 4, "a")
    kind, *nums = read.split()
    ints = [int(v) for v in nums]
    attrs = {kind: ints[0]} if kind in ("start", "end") else {}
    shp = g.node("Shape", [a], "shape", **attrs)
    if kind == "gather":
        picked = g.node("Gather", [shp, g.const("idx", np.array(ints, np.int64))], "pick", axis=0)
    elif kind == "slice":
        bounds = [np.array([v], np.int64) for v in ints[:2] + [0] + ints[2:]]
        picked = g.node("Slice", [shp] + [g.const(f"b{i}", v) for i, v in enumerate(bounds)], "pick")
    else:
        picked = shp
    n = g.node("ReduceProd", [picked], "n", keepdims=1)
    target = g.const("t", np.array([1, -1], np.int64))
    flat = g.node("Reshape", [g.node("Mul", [a, a], "sq"), target], "flat")
    cast = g.node("Cast", [n], "cast", to=1)  # float
    out = g.node("Mul", [g.node("ReduceSum", [flat], "sum", keepdims=0), cast], "scaled")
    an = analyze_channels(g.model([graphs.X], [g.conv(a, 4, 2, "h"), out], out_rank=[4, 1]))
    reasons = an.group_of("a_out", 0).reasons
    assert ("channel count read by Shape 'shape' feeding ReduceProd 'n'" in reasons) == blocks
    if not blocks:   # what is left blocking is the Reshape of a * a, not the Shape
        assert all("Shape" not in r for r in reasons)


def test_total_macs_match_flops_and_fixture_families_have_prunable_groups():
    from fixtures import FAMILIES

    from onnxslim_yolo.analysis.flops import model_stats
    for name, build in FAMILIES.items():
        m = build()
        a = analyze_channels(m)
        assert a.total_macs == model_stats(m).macs
        assert a.prunable_groups(), name
        if name == "yolox":
            assert any(r.kind == "depthwise" for g in a.prunable_groups() for r in g.roles)
        if name == "yolov8":
            kinds = {n.op_type for n in m.graph.node}
            assert "Split" in kinds


def test_macs_count_convs_behind_a_computed_slice_end():
    """torch.chunk exports Slice ends as Shape -> Gather -> Add -> Div -> Mul; onnx's data
    propagation leaves the slice (and the Conv after it) unshaped, folding resolves it."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from onnxslim_yolo.analysis.flops import _infer, _shape_table, model_stats

    def const(name, arr):
        return numpy_helper.from_array(np.asarray(arr), name)
    inits = [const("w1", np.ones((8, 8, 1, 1), np.float32)), const("w2", np.ones((4, 4, 3, 3), np.float32)),
             const("i1", np.array([1], np.int64)), const("one", np.array([1], np.int64)),
             const("two", np.array([2], np.int64)), const("zero", np.array([0], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["y"], name="c1"),
             helper.make_node("Shape", ["y"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i1"], ["g"], name="gather"),
             helper.make_node("Add", ["g", "one"], ["a"], name="add"),
             helper.make_node("Div", ["a", "two"], ["d"], name="div"),
             helper.make_node("Mul", ["d", "one"], ["e"], name="mul"),
             helper.make_node("Slice", ["y", "zero", "e", "i1"], ["h"], name="slice"),
             helper.make_node("Conv", ["h", "w2"], ["z"], name="c2", pads=[1, 1, 1, 1])]
    g = helper.make_graph(nodes, "chunk", [helper.make_tensor_value_info("x", T.FLOAT, [1, 8, 8, 8])],
                          [helper.make_tensor_value_info("z", T.FLOAT, None)], inits)
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])
    assert "z" not in _shape_table(_infer(m))            # what plain inference gives
    stats = model_stats(m)
    assert stats.per_node_macs == {"c1": 8 * 8 * 8 * 8, "c2": 4 * 8 * 8 * 4 * 9}
    assert stats.macs == 4096 + 9216


def test_macs_count_a_matmul_whose_operand_folds_to_a_constant():
    """YOLOE's head multiplies features by text embeddings: a constant Expand-ed to a shape a
    Where computes. Inference leaves the Expand unshaped, and folding turns it into an
    initializer, whose dims must count (the original was counted 0 and its optimized copy, folded
    by canonicalize, in full: '+9.7% MACs' for an exact rewrite)."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    from onnxslim_yolo.analysis.flops import _infer, _shape_table, model_stats

    inits = [numpy_helper.from_array(np.ones((1, 5, 4), np.float32), "emb"),
             numpy_helper.from_array(np.array([1, 5, 4], np.int64), "k"),
             numpy_helper.from_array(np.array([-1, -1, -1], np.int64), "minus"),
             numpy_helper.from_array(np.ones(3, np.int64), "ones"),
             numpy_helper.from_array(np.array([1, 4, 64], np.int64), "flat")]
    nodes = [helper.make_node("Equal", ["k", "minus"], ["eq"], name="eq"),
             helper.make_node("Where", ["eq", "ones", "k"], ["shape"], name="where"),
             helper.make_node("Expand", ["emb", "shape"], ["e"], name="expand"),
             helper.make_node("Reshape", ["x", "flat"], ["f"], name="reshape"),
             helper.make_node("MatMul", ["e", "f"], ["y"], name="mm")]
    g = helper.make_graph(nodes, "yoloe", [helper.make_tensor_value_info("x", T.FLOAT, [1, 4, 8, 8])],
                          [helper.make_tensor_value_info("y", T.FLOAT, None)], inits)
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])
    assert "e" not in _shape_table(_infer(m))            # what plain inference gives
    assert model_stats(m).per_node_macs == {"mm": 5 * 64 * 4}


def test_macs_count_every_level_of_an_fpn_whose_upsampling_sizes_are_computed():
    """Six FPN levels at opset 11, each resolvable only after the one above is folded: folding
    goes on while it makes progress, so every Conv counts."""
    from onnxslim_yolo.analysis.flops import _infer, _unshaped_outputs, model_stats

    m = graphs.fpn_chain()
    assert _unshaped_outputs(_infer(m))          # plain inference leaves the lower levels unshaped
    stats = model_stats(m)
    assert len(stats.per_node_macs) == 6 + 7
    assert stats.macs == graphs.fpn_chain_macs()


def test_a_channel_gather_is_a_one_way_reader_when_asked_and_blocks_otherwise():
    model = graphs.gather_graph()
    a = analyze_channels(model, readers=True)
    s, picked = "a.act_out", "pick_out"
    for j, c in enumerate([4, 0, 5]):
        src, out = a.group_of(s, c), next(g for g in a.groups if (picked, j) in g.channels and
                                          (s, c) not in g.channels)
        assert (picked, j) in src.channels and src.prunable and out.prunable
        assert {(r.kind, r.node, r.index) for r in out.roles} == {("gather", "pick", j), ("consumer", "c", j)}
        assert ("consumer", "c", j) in {(r.kind, r.node, r.index) for r in src.roles}
    for c in (1, 2, 3):   # channels the Gather does not read: no part of c
        assert not any(r.node == "c" for r in a.group_of(s, c).roles)
    off = analyze_channels(model)
    assert all(not off.group_of(s, c).prunable for c in range(6))
    assert any("Gather 'pick'" in r for r in off.group_of(s, 0).reasons)


@pytest.mark.parametrize("form", ["op21", "shape", "const", "minus_one"])
def test_a_group_norm_ties_each_group_and_maps_channels_through(form):
    """Four groups of four: channel c of a is channel c after the norm, the four channels of a
    group are one channel of the analysis, and the output takes the role "groupnorm"."""
    a = analyze_channels(graphs.group_norm_graph(form))
    out = "gn_out" if form == "op21" else "gn.last_out"
    for k in range(4):
        g = _group(a, "a_out", 4 * k)
        assert g.prunable, g.reasons
        assert {i for t, i in g.channels if t == "a_out"} == {4 * k + j for j in range(4)}
        assert {i for t, i in g.channels if t == out} == {4 * k + j for j in range(4)}
        assert [r.index for r in g.of_kind("groupnorm")] == [4 * k + j for j in range(4)]
    assert len(a.prunable_groups()) == 4
    if form != "op21":  # the rows between the Reshapes are groups, not channels of the analysis
        assert "gn.first_out" not in a.channel_counts and "gn.in_out" not in a.channel_counts


def test_a_group_norm_blocks_when_its_pattern_is_broken():
    """Another reader of the grouped rows (the Shape feeding the last Reshape then counts as
    reading the channel count too), and a group count the channels do not divide: each blocks
    the channels with a reason."""
    model = graphs.group_norm_graph("shape")
    model.graph.node.append(helper.make_node("Relu", ["gn.first_out"], ["tap"], name="tap"))
    model.graph.output.append(helper.make_tensor_value_info("tap", TensorProto.FLOAT, None))
    a = analyze_channels(model)
    assert _group(a, "a_out", 0).reasons == (
        "channel count read by Shape 'gn.shape' feeding Reshape 'gn.last'", "consumed by Reshape 'gn.first'")
    assert not _group(a, "gn.last_out", 0).prunable
    model = graphs.group_norm_graph("op21")
    gn = next(n for n in model.graph.node if n.op_type == "GroupNormalization")
    next(at for at in gn.attribute if at.name == "num_groups").i = 3
    a = analyze_channels(model)
    assert _group(a, "a_out", 0).reasons == (
        "consumed by GroupNormalization 'gn' (16 channels in 3 groups)",)


def test_shapes_folded_after_a_computed_reshape_replace_symbolic_ones():
    """Two exported group norms at opset 11: onnx's inference leaves the first one's output and
    so c's output with symbolic dims; the folded copy's static shapes replace them, and both
    norms' groups are prunable (the second was "produced by Reshape 'gn2.last'" before)."""
    from onnxslim_yolo.analysis.flops import infer_static

    model = graphs.group_norm_chain_graph()
    entries = [vi for vi in infer_static(model).graph.value_info if vi.name == "c_out"]
    assert [[d.dim_value for d in vi.type.tensor_type.shape.dim] for vi in entries] == [[1, 8, 8, 8]]
    a = analyze_channels(model)
    for tensor, size in (("a_out", 2), ("c_out", 4)):
        g = _group(a, tensor, 0)
        assert g.prunable, g.reasons
        assert {i for t, i in g.channels if t == tensor} == set(range(size))
