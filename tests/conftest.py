"""Shared test fixtures. Real-model tests skip with a clear reason when ../shared is absent."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("ONNXSLIM_YOLO_SHARED", REPO.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ../shared folder with real models and COCO images; skips when it is not beside the repo."""
    if not (SHARED / "models" / "yolov5n.onnx").exists():
        pytest.skip(f"real models not available: {SHARED}/models/yolov5n.onnx is absent "
                    "(clone ../shared beside the repo to run real-model tests)")
    return SHARED


@pytest.fixture(scope="session")
def yolov5n_path(shared_dir: Path) -> Path:
    return shared_dir / "models" / "yolov5n.onnx"


@pytest.fixture(scope="session")
def yolov5n_bn_path(shared_dir: Path) -> Path:
    return shared_dir / "models" / "yolov5n_bn.onnx"


@pytest.fixture(scope="session")
def coco128(shared_dir: Path) -> Path:
    return shared_dir / "data" / "coco128"
