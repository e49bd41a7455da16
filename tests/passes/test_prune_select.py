"""The greedy selection's choice of the last unit, on stub layers (no model needed)."""
from __future__ import annotations

from onnxslim_yolo.analysis.channels import ChannelGroup
from onnxslim_yolo.passes._prune_select import Layer, _best, allowed_counts, group_steps


def _group(gid: int, macs: int) -> ChannelGroup:
    return ChannelGroup(gid, frozenset(), (), macs, ())


class _Macs:
    def saved(self, groups):
        return sum(g.macs for g in groups)


class _Cost:
    def __init__(self, costs):
        self.costs = costs

    def unit(self, layer, size):
        unit = layer.remaining[:size]
        return unit, self.costs[layer.key[0]]


def _layer(key, macs_per_channel, n=16):
    groups = [_group(100 * len(key) + i, macs_per_channel) for i in range(n)]
    return Layer((key, ()), groups, list(range(n - 8, 0, -8)), 1, list(groups))


def test_of_equal_cost_lumps_the_one_saving_least_is_taken():
    wide, narrow = _layer(("wide",), 1000), _layer(("narrow",), 10)
    cost = _Cost({("wide",): 0.0, ("narrow",): 0.0})
    # 50 MACs still to remove: both 8-channel units (8000 and 80) are over half of it
    best = _best([wide, narrow], set(), cost, _Macs(), {}, remaining=50)
    assert best is not None and best[1] == 1 and best[2] == 80


def test_of_lumps_the_cheaper_one_wins_whatever_it_saves():
    wide, narrow = _layer(("wide",), 15), _layer(("narrow",), 10)
    cost = _Cost({("wide",): 0.5, ("narrow",): 1.0})
    # 70 MACs still to remove: 120 and 80 are both lumps, and both end nearer the target than 0
    best = _best([wide, narrow], set(), cost, _Macs(), {}, remaining=70)
    assert best is not None and best[1] == 0 and best[2] == 120


def test_a_lump_twice_the_remainder_or_more_is_never_taken():
    wide, narrow = _layer(("wide",), 1000), _layer(("narrow",), 10)
    cost = _Cost({("wide",): 0.0, ("narrow",): 1.0})
    # 50 MACs to go: the wide unit (8000) would overshoot by far more than stopping falls short
    best = _best([wide, narrow], set(), cost, _Macs(), {}, remaining=50)
    assert best is not None and best[1] == 1 and best[2] == 80
    assert _best([wide, narrow], set(), cost, _Macs(), {}, remaining=40) is None   # 80 = 2 x 40
    # unless the overshoot is within the slack allowed past the target
    best = _best([wide, narrow], set(), cost, _Macs(), {}, remaining=40, slack=40)
    assert best is not None and best[1] == 1 and best[2] == 80


def test_a_unit_under_half_the_remainder_beats_any_lump():
    wide, narrow = _layer(("wide",), 1000), _layer(("narrow",), 10)
    cost = _Cost({("wide",): 0.0, ("narrow",): 5.0})
    best = _best([wide, narrow], set(), cost, _Macs(), {}, remaining=1000)
    assert best is not None and best[1] == 1


def test_channel_counts_are_multiples_of_round_to_or_the_layer_is_kept_whole():
    """A layer no wider than --round-to took any count (--round-to 32 left layers of 13, 27 and
    31 channels, which run slower); it has no multiple to shrink to, so it stays whole."""
    assert allowed_counts(40, 8, 1) == [32, 24, 16, 8]
    assert allowed_counts(16, 32, 1) == [] and allowed_counts(8, 8, 1) == []
    assert allowed_counts(32, 32, 1) == []
    assert allowed_counts(64, 32, 1) == [32] and allowed_counts(48, 16, 20) == [32]
    assert allowed_counts(5, 1, 2) == [4, 3, 2]   # round_to 1: any count down to min_channels


def _wide_groups(widths, n=4):
    """``n`` groups holding ``widths[t]`` channels of each tensor t (a grouped Conv's groups)."""
    return [ChannelGroup(k, frozenset((t, k * w + i) for t, w in widths.items() for i in range(w)),
                         (), 0, ()) for k in range(n)]


def test_round_to_and_min_channels_count_channels_through_grouped_convs():
    assert group_steps(_wide_groups({"a": 1, "b": 1}), 8, 1) == (8, 1)        # one channel a group
    assert group_steps(_wide_groups({"a": 16, "b": 16}), 8, 1) == (1, 1)      # RegNet: 16 a group
    assert group_steps(_wide_groups({"a": 4, "b": 4}), 8, 1) == (2, 1)        # ResNeXt 32x4d
    assert group_steps(_wide_groups({"a": 2, "b": 3, "c": 6}), 8, 1) == (8, 1)
    assert group_steps(_wide_groups({"a": 16, "b": 32}), 8, 40) == (1, 3)     # 3 x 16 >= 40
    assert group_steps(_wide_groups({"a": 4}), 1, 1) == (1, 1)
    # a Split part: the groups it does not hold count 0 there
    parts = _wide_groups({"a": 1})
    parts[0] = ChannelGroup(0, parts[0].channels | {("part", 0)}, (), 0, ())
    assert group_steps(parts, 8, 1) == (8, 1)
    # 10 RegNet groups of 16 channels keep 9, 8, ... of them: every count a multiple of 8 channels
    assert allowed_counts(10, *group_steps(_wide_groups({"a": 16}, 10), 8, 1)) == list(range(9, 0, -1))
