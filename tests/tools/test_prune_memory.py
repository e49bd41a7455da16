"""tools/prune_memory.py runs end to end on the demo model (so it cannot rot)."""
from __future__ import annotations

import json
from pathlib import Path

import onnx

from fixtures import demo_paths


def test_prune_memory_runs_and_counts_the_dense_convs(tmp_path: Path):
    from tools.prune_memory import main

    model, images, _ = demo_paths()
    out = tmp_path / "m.json"
    assert main([str(model), "--calib", str(images), "--calib-limit", "4", "--json", str(out)]) == 0
    row = json.loads(out.read_text())
    m = onnx.load(str(model))
    inits = {t.name: t.dims for t in m.graph.initializer}
    dense = [n for n in m.graph.node if n.op_type == "Conv" and len(inits[n.input[1]]) == 4
             and all(a.i == 1 for a in n.attribute if a.name == "group")]
    assert row["dense_convs"] == len(dense) > 0
    assert row["exit_code"] == 0 and row["peak_rss_gb"] > 0 and 0.05 < row["mac_reduction"] < 0.2
    assert row["refit_note"] is None and row["refit_outputs_held_gb"] == row["refit_outputs_asked_gb"]
