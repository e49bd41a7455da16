"""analysis.suffix: the pruning probe re-runs only the part of the model below a change."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from fixtures import FAMILIES
from onnxslim_yolo import ir, verify
from onnxslim_yolo.analysis import importance as imp, sensitivity


def _params(model):
    conv = imp.read_params(model).conv
    return {n: (w, b if b is not None else np.zeros(w.shape[0], np.float32)) for n, (w, b) in conv.items()}


def _perturbed(params, names, rng, scale=0.2):
    return {n: ((params[n][0] * (1 + scale * rng.standard_normal(params[n][0].shape))).astype(np.float32),
                params[n][1]) for n in names}


def _probes(model, n_feeds=2, **kw):
    params = _params(model)
    feeds = verify.random_feeds(model, n_feeds, 0)
    return params, sensitivity.RefitProbe(model, params, feeds, 1, suffix=False), \
        sensitivity.RefitProbe(model, params, feeds, 1, **kw)


@pytest.mark.parametrize("family", ["yolov5_v6", "yolov8", "yolox"])
def test_suffix_runs_measure_what_whole_model_runs_measure(family):
    """Concat, Resize, C2f Split and depthwise Convs: a change anywhere in the network measures
    the same from the cached base activations as from a whole run, and late changes run a
    suffix of a few nodes only. (Suffix sessions bake the unchanged weights in, and onnxruntime's
    pre-packed Conv kernels round differently from those reading weights as inputs: on these
    random-weight fixtures that is up to 2e-5 of the output's range, hence rel 2e-3.)"""
    model = FAMILIES[family](bn=False)
    params, full, part = _probes(model)
    names = list(params)
    rng = np.random.default_rng(1)
    for pick in ([names[0]], [names[len(names) // 2]], [names[-1]], [names[1], names[-2]]):
        for scale in (0.2, 0.05):   # the same Convs again, other weights: one cached session
            p = _perturbed(params, pick, rng, scale)
            want, got = full.measure(p), part.measure(p)
            assert want > 1e-6
            assert got == pytest.approx(want, rel=2e-3, abs=1e-9)
    assert part.suffixes.runs == 8 * 2          # every measure ran suffixes, on both feeds
    assert len(part.suffixes.sessions) == 4
    last = part.suffixes.below[names[-1]]
    assert 0 < len(last) < len(model.graph.node) // 4
    assert part.measure({}) == pytest.approx(full.measure({}), rel=1e-6)   # the cached base itself
    assert part.suffixes.runs == 8 * 2


def test_rebase_moves_the_cache_and_later_changes_start_from_it():
    model = FAMILIES["yolov8"](bn=False)
    params, full, part = _probes(model)
    names = list(params)
    rng = np.random.default_rng(2)
    base = _perturbed(params, [names[3]], rng)
    assert part.rebase(base) == pytest.approx(full.rebase(base), rel=2e-3)
    for pick in ([names[-1]], [names[5], names[-3]], [names[3]]):
        p = dict(base)
        p.update(_perturbed(params, pick, rng))
        assert part.measure(p) == pytest.approx(full.measure(p), rel=2e-3)
    # going back to the original weights is a change of names[3] relative to the base
    assert part.measure({}) == pytest.approx(full.measure({}), rel=2e-3, abs=1e-5)
    assert part.measure(base) == pytest.approx(full.measure(base), rel=2e-3)


def test_a_cache_over_its_cap_keeps_the_latest_boundaries_that_fit(monkeypatch):
    """Over ``cache_bytes`` the cache is kept while twice its size stays free. With less, it keeps
    the boundaries of the latest Convs that fit: their changes still run suffixes, earlier ones
    the whole model, both measuring what whole runs measure. With nothing fitting, every change
    runs the whole model."""
    from onnxslim_yolo.analysis import suffix

    model = FAMILIES["yolox"](bn=False)
    params, full, part = _probes(model)
    names = list(params)
    small = sensitivity.RefitProbe(model, params, verify.random_feeds(model, 2, 0), 1)
    sx = small.suffixes
    sx.cache_bytes = 1
    values = [dict(v) for v in sx.cache]
    size = sum(a.nbytes for v in values for a in v.values())
    monkeypatch.setattr(suffix, "available_memory", lambda: 2 * size)     # the old cache counts as free
    sx.store(values)
    assert sx.ready and sx.kept == set(sx.below)
    monkeypatch.setattr(suffix, "available_memory", lambda: 0)            # cap: a third of the old cache
    sx.store(values)
    held = sum(a.nbytes for v in sx.cache for a in v.values())
    assert sx.ready and 0 < len(sx.kept) < len(sx.below) and held <= size // 3
    assert names[-1] in sx.kept and names[0] not in sx.kept
    rng = np.random.default_rng(3)
    late, early = _perturbed(params, [names[-1]], rng), _perturbed(params, [names[0]], rng)
    assert small.measure(late) == pytest.approx(full.measure(late), rel=2e-3)
    assert sx.runs == 2                                                   # a suffix run per feed
    assert small.measure(early) == pytest.approx(full.measure(early), rel=1e-6)
    assert sx.runs == 2                                                   # a whole run
    assert small.rebase(late) == pytest.approx(full.rebase(late), rel=2e-3)
    assert set(sx.cache[0]) <= set(values[0]) and sx.runs == 4            # rebased by suffix runs
    part_of = set(sx.cache[0])
    assert sx.wanted() == sorted(part_of)         # a base run captures the part held, not all
    both = {**late, **early}
    assert small.rebase(both) == pytest.approx(full.rebase(both), rel=2e-3)   # whole base runs
    assert sx.runs == 4 and set(sx.cache[0]) <= part_of and names[-1] in sx.kept   # (the cap shrank)
    later = {**both, **_perturbed(params, [names[-1]], rng)}     # the last Conv changed from the base
    assert small.measure(later) == pytest.approx(full.measure(later), rel=2e-3)
    assert sx.runs == 6
    monkeypatch.setattr(suffix.Suffixes, "limit", lambda self: 1)
    sx.store(values)
    assert not sx.ready
    p = _perturbed(params, [names[-1]], rng)
    assert small.measure(p) == pytest.approx(full.measure(p), rel=1e-6)
    assert small.rebase(p) == pytest.approx(full.measure(p), rel=1e-6)
    assert sx.runs == 6


def test_capture_runs_only_the_nodes_its_tensors_need():
    """activations.capture builds its session over the ancestors of the captured tensors (a
    prefix of the model) and gets the values the whole model computes."""
    from onnxslim_yolo.analysis import activations
    model = FAMILIES["yolov8"](bn=False)
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    early = convs[2].input[0]
    prefix = verify.with_outputs(model, [early], only=True)
    assert [o.name for o in prefix.graph.output] == [early]
    assert 0 < len(prefix.graph.node) < len(model.graph.node) // 4
    feeds = verify.random_feeds(model, 1, 0)
    got = list(activations.capture(model, feeds, [early]))[0][early]
    whole = verify.session(verify.with_outputs(model, [early]), threads=1)
    names = [o.name for o in whole.get_outputs()]
    want = verify.run(whole, feeds[0])[names.index(early)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _with_if_tail(model):
    """``model`` whose only output is an If (torchvision's SSD and R-CNN post-processing style) over
    its original output; the branches read that output from the outer scope, which no input of
    the If names."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    out = m.graph.output[0].name

    def branch(name, op):
        node = helper.make_node(op, [out], [name + "_y"], name=name, keepdims=0)
        y = helper.make_tensor_value_info(name + "_y", onnx.TensorProto.FLOAT, None)
        return helper.make_graph([node], name, [], [y])
    nodes = [helper.make_node("ReduceMax", [out], ["tail_max"], name="tail_max", keepdims=0),
             helper.make_node("Greater", ["tail_max", "tail_zero"], ["tail_cond"], name="tail_cond"),
             helper.make_node("If", ["tail_cond"], ["tail_out"], name="tail_if",
                              then_branch=branch("then", "ReduceSum"),
                              else_branch=branch("else", "ReduceMin"))]
    m.graph.initializer.append(numpy_helper.from_array(np.array(0.0, np.float32), "tail_zero"))
    m.graph.node.extend(nodes)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info("tail_out", onnx.TensorProto.FLOAT, None))
    return m


def test_an_if_tail_after_the_watched_tensors_neither_runs_nor_blocks_the_suffixes():
    """A subgraph node blocks cutting only where the metric needs it: with the head maps watched,
    an If after them is dropped from the probe's model and suffix runs still measure what whole
    runs measure."""
    model = _with_if_tail(FAMILIES["yolov8"](bn=False))
    assert ir.has_subgraphs(model.graph)
    params, full, part = _probes(model)
    assert type(part.metric).__name__ == "HeadMetric"
    assert "tail_if" not in {n.name for n in part.model.graph.node}
    assert part.suffixes.usable
    names = list(params)
    rng = np.random.default_rng(4)
    for pick in ([names[-1]], [names[2], names[-2]]):
        p = _perturbed(params, pick, rng)
        assert part.measure(p) == pytest.approx(full.measure(p), rel=2e-3)
    assert part.suffixes.runs == 2 * 2


def test_with_outputs_only_keeps_a_needed_subgraph_node_and_everything_around_it():
    model = _with_if_tail(FAMILIES["yolov8"](bn=False))
    head = model.graph.node[0].output[0]
    cut = verify.with_outputs(model, [head], only=True)
    assert [o.name for o in cut.graph.output] == [head]
    assert len(cut.graph.node) == 1
    kept = verify.with_outputs(model, ["tail_out"], only=True)     # the If is needed: nothing cut
    assert len(kept.graph.node) == len(model.graph.node)
    assert [o.name for o in kept.graph.output] == ["tail_out"]


def test_suffix_sessions_are_kept_within_their_byte_budget(monkeypatch):
    """Over SESSION_BYTES the least recently used suffix sessions go (at least the newest stays);
    the measures do not change, a dropped session is built again."""
    from onnxslim_yolo.analysis import suffix

    model = FAMILIES["yolov8"](bn=False)
    params, full, part = _probes(model)
    names = list(params)
    picks = [[names[0]], [names[-1]], [names[0]]]
    rng = np.random.default_rng(4)
    changes = [_perturbed(params, p, rng) for p in picks]
    roomy = [part.measure(c) for c in changes]
    assert len(part.suffixes.sessions) == 2 and len(part.suffixes.session_bytes) == 2
    assert all(v > 0 for v in part.suffixes.session_bytes.values())
    monkeypatch.setattr(suffix, "SESSION_BYTES", 1)
    part = _probes(model)[2]
    tight = [part.measure(c) for c in changes]
    assert len(part.suffixes.sessions) == 1 and len(part.suffixes.session_bytes) == 1
    part.rebase(changes[1])             # a new base drops the sessions built on the old one
    assert not part.suffixes.sessions and not part.suffixes.session_bytes
    assert tight == pytest.approx(roomy, rel=1e-6)
