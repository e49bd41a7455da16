"""Packaging: every package folder is listed in setup.cfg and passes/ installs as onnxslim_yolo.passes."""
from __future__ import annotations

import configparser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _cfg() -> configparser.ConfigParser:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg


def test_every_package_folder_is_listed():
    listed = {p.strip() for p in _cfg()["options"]["packages"].split() if p.strip()}
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "onnxslim_yolo").rglob("__init__.py")}
    found.add("onnxslim_yolo.passes")
    assert found <= listed, f"missing from setup.cfg packages: {sorted(found - listed)}"


def test_passes_folder_maps_to_subpackage_not_top_level():
    mapping = _cfg()["options"]["package_dir"]
    assert "onnxslim_yolo.passes = passes" in mapping
    listed = _cfg()["options"]["packages"].split()
    assert "passes" not in listed
    import onnxslim_yolo.passes as p
    assert Path(p.__file__).parent.name == "passes"


def test_console_script_and_plugin_group_declared():
    eps = _cfg()["options.entry_points"]
    assert "onnxslim-yolo = onnxslim_yolo.cli:main" in eps["console_scripts"]
    assert "onnxslim_yolo.passes" in eps
