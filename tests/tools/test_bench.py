"""The benchmark script runs end to end on the tiny demo model (so it cannot rot)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from fixtures import demo_paths

pytest.importorskip("onnxslim", reason="the benchmark compares against onnxslim (pip install .[bench])")


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path):
    from tools.bench import main

    model, images, labels = demo_paths()
    variants = "original,onnxslim,ort-qdq-all,optimize,int8"
    rc = main([str(model), "--calib", str(images), "--labels", str(labels), "--out", str(tmp_path),
               "--variants", variants, "--runs", "3", "--threads", "1", "--no-progress"])
    assert rc == 0
    data = json.loads((tmp_path / "bench.json").read_text())
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == variants.split(",")
    assert rows["original"]["latency_ratio"] == pytest.approx(1.0)
    for name, r in rows.items():
        assert r.get("error") is None, (name, r.get("error"))
        assert r["size_mb"] > 0 and r["gflops"] > 0 and 0.0 <= r["map"] <= 1.0
        if name != "original":
            assert r["seconds"] > 0 and r["peak_rss_mb"] > 50
    # exact rewrites keep the same accuracy
    assert rows["optimize"]["map"] == pytest.approx(rows["original"]["map"], abs=1e-3)
    md = (tmp_path / "bench.md").read_text()
    assert "| demo" in md or "yolov5s_demo" in md
