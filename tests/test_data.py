"""Image loading, letterbox arithmetic, presets, input iterators and their one-line errors."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper
from PIL import Image

import fixtures
from onnxslim_yolo import data
from onnxslim_yolo.pass_base import UsageError


def declared_model(in_shape: Sequence, out_shape: Sequence, meta: Optional[Dict[str, str]] = None,
                   in_name: str = "images") -> onnx.ModelProto:
    """A model whose declared input/output shapes are all that matters (never run)."""
    g = helper.make_graph([helper.make_node("Identity", [in_name], ["output"])], "g",
                          [helper.make_tensor_value_info(in_name, TensorProto.FLOAT, list(in_shape))],
                          [helper.make_tensor_value_info("output", TensorProto.FLOAT, list(out_shape))])
    m = helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])
    for k, v in (meta or {}).items():
        m.metadata_props.add(key=k, value=v)
    return m


def write_image(path: Path, h: int, w: int, mode: str = "RGB", value=(200, 100, 50)) -> Path:
    arr = np.empty((h, w, 3), np.uint8)
    arr[:] = value
    im = Image.fromarray(arr)
    if mode != "RGB":
        im = im.convert(mode)
    im.save(path)
    return path


# ---------------------------------------------------------------------------------- letterbox
@pytest.mark.parametrize("hw, size, ratio, pad, unpadded", [
    ((480, 640), (640, 640), 1.0, (0, 80), (480, 640)),        # COCO landscape: 80 rows each side
    ((100, 50), (64, 64), 0.64, (16, 0), (64, 32)),           # portrait: 16 columns each side
    ((10, 21), (32, 32), 32 / 21, (0, 8), (15, 32)),          # dh = 8.5: top round(8.4)=8, bottom 9
    ((427, 640), (640, 640), 1.0, (0, 106), (427, 640)),      # dh = 106.5: top 106, bottom 107
    ((32, 32), (64, 96), 2.0, (16, 0), (64, 64)),             # upscaling, non-square target
])
def test_letterbox_numbers(hw, size, ratio, pad, unpadded):
    img = np.full((*hw, 3), 7, np.uint8)
    out, r, p = data.letterbox(img, size, center=True, pad_value=114)
    assert out.shape == (*size, 3)
    assert r == pytest.approx(ratio)
    assert p == pad
    content = (out[..., 0] == 7)
    rows, cols = np.nonzero(content)
    assert (rows.min(), cols.min()) == (pad[1], pad[0])
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == unpadded
    assert content.sum() == unpadded[0] * unpadded[1]
    assert np.all(out[~content] == 114)


def test_letterbox_top_left_pads_right_and_bottom_only():
    img = np.full((100, 50, 3), 9, np.uint8)
    out, r, p = data.letterbox(img, (64, 64), center=False, pad_value=0)
    assert p == (0, 0) and r == pytest.approx(0.64)
    assert np.all(out[:, :32] == 9) and np.all(out[:, 32:] == 0)


def test_preprocess_presets_channel_order_and_scale():
    img = np.zeros((8, 8, 3), np.uint8)
    img[..., 0] = 255  # pure red
    x, meta = data.preprocess(img, data.PRESETS["yolov5"], (8, 8))
    assert x.dtype == np.float32 and x.shape == (3, 8, 8)
    assert np.allclose(x[0], 1.0) and np.allclose(x[1:], 0.0)
    x, _ = data.preprocess(img, data.PRESETS["yolox"], (8, 8))
    assert np.allclose(x[2], 255.0) and np.allclose(x[:2], 0.0)  # BGR, unscaled
    assert meta.orig_hw == (8, 8) and meta.ratio == 1.0 and meta.pad == (0, 0)


def test_the_imagenet_preset_normalises_each_channel_and_a_pixel_model_gets_pixels():
    img = np.zeros((8, 8, 3), np.uint8)
    img[...] = (124, 116, 104)  # about the ImageNet mean in 0-255
    x, _ = data.preprocess(img, data.PRESETS["imagenet"], (8, 8))
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    np.testing.assert_allclose(x[:, 0, 0], (np.array([124, 116, 104]) / 255 - mean) / std, atol=1e-6)
    assert np.abs(x).max() < 0.01
    uint8_in = _normalising([("Cast", None)], TensorProto.UINT8, False)
    fed = data.get_preset("imagenet", uint8_in)
    assert (fed.scale, fed.mean, fed.std) == (1.0, None, None)
    x, _ = data.preprocess(img, fed, (8, 8))
    assert np.array_equal(x[:, 0, 0], [124, 116, 104])


def test_presets_table():
    v5, v8, x = data.PRESETS["yolov5"], data.PRESETS["yolov8"], data.PRESETS["yolox"]
    assert (v5.rgb, v5.scale, v5.center, v5.pad_value) == (True, 1 / 255, True, 114)
    assert (v8.rgb, v8.scale, v8.center) == (True, 1 / 255, True)
    assert (x.rgb, x.scale, x.center, x.pad_value) == (False, 1.0, False, 114)


# ------------------------------------------------------------------------------- preset choice
@pytest.mark.parametrize("out_shape, meta, expected", [
    ((1, 25200, 85), {"stride": "32", "names": "{0: 'person'}"}, "yolov5"),
    ((1, 84, 8400), {}, "yolov8"),
    ((1, 84, 8400), {"task": "detect", "stride": "32", "imgsz": "[640, 640]"}, "yolov8"),
    ((1, 8400, 85), {}, "yolox"),
    ((1, 25200, 85), {}, "yolov5"),
    (("batch", "n", "c"), {}, "yolov5"),
    ((1, 25200, 85), {"model": "YOLOX-s"}, "yolox"),
])
def test_detect_preset(out_shape, meta, expected):
    assert data.detect_preset(declared_model((1, 3, 640, 640), out_shape, meta)) == expected


@pytest.mark.parametrize("out_shape, meta, expected", [
    ((1, 25200, 85), {"stride": "32", "names": "{0: 'person'}"},
     ("yolov5", "the exporter named in the model's metadata")),
    ((1, 8400, 85), {}, ("yolox", "the output layout, read as yolox")),
    ((1, 84, 8400), {}, ("yolov8", "the output layout, read as v8")),
    (("batch", "n", "c"), {}, ("yolov5", "the default: nothing in the model names another family")),
])
def test_preset_choice_says_what_chose_it(out_shape, meta, expected):
    assert data.preset_choice(declared_model((1, 3, 640, 640), out_shape, meta)) == expected


def test_describe_preset():
    assert data.describe_preset(data.PRESETS["yolox"]) == "yolox: BGR, pixel values 0-255, letterbox top-left"
    assert data.describe_preset(data.PRESETS["imagenet"]).startswith(
        "imagenet: RGB, pixels / 255 (0-1), minus the ImageNet mean, over its std, letterbox")


def _folded_ones(model: onnx.ModelProto, value: float = 1.0, ones_last: bool = False) -> onnx.ModelProto:
    """``model`` (a YOLOv6-style fixture) with its ConstantOfShape of ones replaced by an
    initializer, as a constant-folding exporter writes it; ``ones_last`` moves that column after
    the class scores (column 8 instead of 4)."""
    g = model.graph
    cos = next(n for n in g.node if n.op_type == "ConstantOfShape")
    shape_node = next(n for n in g.node if n.output[0] == cos.input[0])
    g.initializer.append(onnx.numpy_helper.from_array(np.full((1, 84, 1), value, np.float32), cos.output[0]))
    g.node.remove(cos)
    g.node.remove(shape_node)
    if ones_last:
        cat = next(n for n in g.node if n.output[0] == g.output[0].name)
        ins = list(cat.input)
        del cat.input[:]
        cat.input.extend(ins[:2] + ins[3:] + ins[2:3])
    return model


@pytest.mark.parametrize("dynamic_batch", [False, True])
def test_yolov6_ones_objectness_is_fed_rgb_0_1(dynamic_batch):
    """A row per grid point is YOLOX's layout (BGR 0-255), but a constant objectness column of
    ones is how YOLOv6 fills it, and YOLOv6 wants RGB 0-1."""
    v6 = fixtures.build_yolox(decode_outputs=True, ones_objectness=True, dynamic_batch=dynamic_batch)
    assert data.ones_objectness(v6) and data.detect_preset(v6) == "yolov6"
    preset = data.get_preset(None, v6)
    assert (preset.rgb, preset.scale, preset.center) == (True, 1 / 255, True)
    yolox = fixtures.build_yolox(decode_outputs=True, dynamic_batch=dynamic_batch)
    assert not data.ones_objectness(yolox) and data.detect_preset(yolox) == "yolox"


def test_ones_objectness_from_a_folded_constant_and_only_in_column_4():
    base = fixtures.build_yolox(decode_outputs=True, ones_objectness=True)
    folded = _folded_ones(onnx.ModelProto.FromString(base.SerializeToString()))
    onnx.checker.check_model(folded)
    assert data.detect_preset(folded) == "yolov6"
    halves = _folded_ones(onnx.ModelProto.FromString(base.SerializeToString()), value=0.5)
    assert not data.ones_objectness(halves) and data.detect_preset(halves) == "yolox"
    shifted = _folded_ones(onnx.ModelProto.FromString(base.SerializeToString()), ones_last=True)
    onnx.checker.check_model(shifted, full_check=True)
    assert not data.ones_objectness(shifted) and data.detect_preset(shifted) == "yolox"


def test_cli_preset_choices_are_the_presets():
    from onnxslim_yolo import cli
    from onnxslim_yolo.cli_check import check_command
    from onnxslim_yolo.cli_eval import eval_command

    for cmd in (cli.optimize, check_command, eval_command):
        opt = next(p for p in cmd.params if p.name == "preprocess")
        assert list(opt.type.choices) == list(data.PRESETS), cmd.name
    assert "yolov6" in data.PRESETS


def test_unknown_preset_name_is_usage_error():
    with pytest.raises(UsageError, match="unknown preprocessing preset 'ssd'"):
        data.get_preset("ssd", declared_model((1, 3, 64, 64), (1, 252, 9)))


def test_model_input_dynamic_size_uses_override_then_metadata_then_640():
    m = declared_model((1, 3, "h", "w"), (1, 84, "n"))
    assert data.model_input(m) == ("images", (3, 640, 640))
    assert data.model_input(m, (1, 3, 320, 256)) == ("images", (3, 320, 256))
    m.metadata_props.add(key="imgsz", value="[480, 512]")
    assert data.model_input(m) == ("images", (3, 480, 512))



def test_model_input_refuses_an_input_shape_against_a_fixed_dim():
    """eval --input-shape 1,3,320,320 on a model fixed at 640 reached onnxruntime: exit 4 (a pass
    broke its contract, though eval runs none) with its message cut off; check refused it."""
    m = declared_model((1, 3, 64, 64), (1, 84, 42))
    assert data.model_input(m, (1, 3, 64, 64)) == ("images", (3, 64, 64))
    for shape, axis, fixed in (((1, 3, 32, 32), 2, 64), ((32, 64), 2, 64), ((2, 3, 64, 64), 0, 1)):
        with pytest.raises(UsageError, match=rf"input 'images' is \[1, 3, 64, 64\], and axis {axis} is "
                                             rf"fixed at {fixed}; only its symbolic dims can be set"):
            data.model_input(m, shape)
    nhwc = declared_model(("n", 64, 64, 3), (1, 84, 42))
    assert data.model_input(nhwc, (4, 64, 64, 3)) == ("images", (3, 64, 64))   # the batch is symbolic
    with pytest.raises(UsageError, match="axis 1 is fixed at 64"):
        data.model_input(nhwc, (1, 32, 64, 3))
# ------------------------------------------------------------------------------------ images
def test_list_images_sorted_and_filtered(tmp_path: Path):
    for n in ("b.png", "a.JPG", "c.bmp", "notes.txt"):
        (tmp_path / n).write_bytes(b"x")
    assert [p.name for p in data.list_images(tmp_path)] == ["a.JPG", "b.png", "c.bmp"]


def test_list_images_errors_name_the_folder(tmp_path: Path):
    with pytest.raises(UsageError, match=f"{tmp_path}/missing: image folder does not exist"):
        data.list_images(tmp_path / "missing")
    with pytest.raises(UsageError, match="no images found"):
        data.list_images(tmp_path)
    arrays = tmp_path / "arrays"
    arrays.mkdir()
    np.save(arrays / "a.npy", np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(UsageError, match=r"no images found .*; input arrays are read from one \.npy or "
                                         r"\.npz file"):
        data.list_images(arrays)
    f = tmp_path / "x.jpg"
    f.write_bytes(b"x")
    with pytest.raises(UsageError, match="not a folder"):
        data.list_images(f)


def test_read_image_converts_gray_rgba_palette(tmp_path: Path):
    for mode in ("L", "RGBA", "P"):
        p = write_image(tmp_path / f"{mode}.png", 5, 7, mode, (102, 102, 102))  # in the web palette
        img = data.read_image(p)
        assert img.shape == (5, 7, 3) and img.dtype == np.uint8
        assert np.all(img == 102)


def test_read_image_undecodable_names_the_file(tmp_path: Path):
    p = tmp_path / "broken.jpg"
    p.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(UsageError, match="broken.jpg: cannot decode image"):
        data.read_image(p)


def test_read_image_turns_by_exif_orientation_as_opencv_does(tmp_path: Path):
    """A phone photo stored landscape with Orientation 6 is shown, and labelled, portrait: it was
    read as stored, so its labels were scaled to the swapped size (4 images: mAP 0.01 for 0.82)."""
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :10] = (255, 0, 0)                    # red on the left of the stored pixels
    exif = Image.Exif()
    exif[data.EXIF_ORIENTATION] = 6              # shown turned 90 degrees clockwise
    Image.fromarray(arr).save(tmp_path / "six.jpg", exif=exif, quality=100)
    img = data.read_image(tmp_path / "six.jpg")
    assert img.shape == (40, 20, 3)
    assert img[:10, :, 0].min() > 200 and img[30:, :, 0].max() < 60   # the left edge is now the top
    Image.fromarray(arr).save(tmp_path / "plain.jpg", quality=100)
    assert data.read_image(tmp_path / "plain.jpg").shape == (20, 40, 3)


def test_read_image_uses_a_jpeg_with_a_broken_exif_block_as_stored(tmp_path: Path, caplog):
    """An APP1 'Exif' block that is not TIFF data stopped the run ('cannot decode image
    (SyntaxError: not a TIFF file)'), though the pixels decode and OpenCV ignores such a block."""
    import struct

    arr = np.zeros((6, 10, 3), np.uint8)
    arr[:, :5] = 200
    # with a dpi, as a camera writes it (without, Pillow reads the EXIF at open for one and hides the error)
    Image.fromarray(arr).save(tmp_path / "ok.jpg", quality=100, dpi=(72, 72))
    raw = (tmp_path / "ok.jpg").read_bytes()
    payload = b"Exif\x00\x00" + bytes(range(7, 71))
    bad = tmp_path / "bad_exif.jpg"
    bad.write_bytes(raw[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + raw[2:])
    with caplog.at_level("WARNING"):
        img = data.read_image(bad)
    assert img.shape == (6, 10, 3) and np.array_equal(img, data.read_image(tmp_path / "ok.jpg"))
    try:   # Pillow 9.0 reads such a block as empty, without an error to warn about
        Image.open(bad).getexif()
        unreadable = False
    except Exception:
        unreadable = True
    assert ("bad_exif.jpg: EXIF block unreadable" in caplog.text) == unreadable


def test_read_image_takes_images_past_pillows_pixel_limit_and_restores_it(tmp_path: Path, monkeypatch):
    """A 14000x14000 aerial tile was refused as a 'DecompressionBombError' (Pillow's 89 Mpx), its
    reason cut at 100 characters; OpenCV, which ultralytics reads with, allows 2**30 pixels."""
    write_image(tmp_path / "tile.png", 40, 40)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)   # Pillow's limit, scaled down: 1600 is over twice it
    assert data.read_image(tmp_path / "tile.png").shape == (40, 40, 3)
    assert Image.MAX_IMAGE_PIXELS == 100   # the caller's Pillow setting is left as it was
    monkeypatch.setattr(data, "MAX_PIXELS", 100)
    with pytest.raises(UsageError) as err:
        data.read_image(tmp_path / "tile.png")
    assert str(err.value).endswith("DOS attack.)")   # the reason whole, not cut at 100 characters


def test_letterbox_keeps_a_row_of_a_sliver_image():
    """A 2000x1 image at 640 rounded its height to 0 rows: 'height and width must be > 0', a
    traceback in eval and check."""
    out, r, pad = data.letterbox(np.full((1, 2000, 3), 9, np.uint8), (640, 640))
    assert out.shape == (640, 640, 3) and r == pytest.approx(0.32)
    assert (out[:, :, 0] == 9).sum(axis=0).tolist() == [1] * 640 and pad == (0, 319)


def test_read_image_scales_16_bit_images_to_8_bits(tmp_path: Path):
    """Pillow's RGB conversion clipped 16-bit values: every pixel read 255 (mAP 0.0, calibration
    on white images), where OpenCV keeps the high byte."""
    g = np.array([[0, 257, 32896, 65535]], np.uint16)
    Image.fromarray(g).save(tmp_path / "g16.png")
    img = data.read_image(tmp_path / "g16.png")
    assert img.shape == (1, 4, 3) and img[0, :, 0].tolist() == [0, 1, 128, 255]
    assert (img == img[..., :1]).all()
    # a 32-bit integer image within 0-255 keeps its values (only wider ones are 16-bit data)
    Image.fromarray(np.array([[0, 7, 200, 255]], np.int32), "I").save(tmp_path / "i32.tif")
    assert data.read_image(tmp_path / "i32.tif")[0, :, 0].tolist() == [0, 7, 200, 255]


def test_image_folders_read_webp_and_tiff_and_say_what_they_leave(tmp_path: Path, caplog):
    for n in ("a.webp", "b.tif", "c.TIFF", "d.png"):
        write_image(tmp_path / n, 6, 8)
    (tmp_path / "._d.png").write_bytes(b"\x00\x05\x16\x07")   # a macOS resource fork: no image
    (tmp_path / "more").mkdir()
    write_image(tmp_path / "more" / "e.png", 6, 8)
    with caplog.at_level("WARNING"):
        files = data.list_images(tmp_path)
        assert data.list_images(tmp_path) == files
    assert [f.name for f in files] == ["a.webp", "b.tif", "c.TIFF", "d.png"]
    assert all(data.read_image(f).shape == (6, 8, 3) for f in files)
    assert caplog.text.count("1 images in its sub-folders are not read (only the 4 beside them)") == 1
    only = tmp_path / "only"
    (only / "sub").mkdir(parents=True)
    write_image(only / "sub" / "x.jpg", 6, 8)
    with pytest.raises(UsageError, match=r"only: no images found \(looked for .*\); 1 are in its "
                                         r"sub-folders, which are not read: pass one of them$"):
        data.list_images(only)


def test_each_run_says_what_its_folders_leave_out(tmp_path: Path, caplog):
    """The warning was given once per process: a script that evaluated two models on one folder
    (or optimized, or checked) was told of its sub-folder images in the first run only."""
    from onnxslim_yolo.evaluate import evaluate

    model, images, labels = fixtures.demo_paths()
    folder = tmp_path / "images"
    folder.mkdir()
    for f in sorted(images.iterdir())[:2]:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "more").mkdir()
    write_image(folder / "more" / "e.png", 6, 8)
    with caplog.at_level("WARNING"):
        for _ in range(2):
            evaluate(model, folder, labels, progress=False, threads=1)
    assert caplog.text.count("1 images in its sub-folders are not read (only the 2 beside them)") == 2


def test_read_image_errors_say_why_in_one_line(tmp_path: Path, monkeypatch):
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(UsageError, match=r"empty.jpg: cannot decode image \(an empty file\)$"):
        data.read_image(tmp_path / "empty.jpg")
    write_image(tmp_path / "big.png", 40, 40)
    monkeypatch.setattr(data, "MAX_PIXELS", 100)   # 1600 pixels: over twice the limit
    with pytest.raises(UsageError, match=r"big.png: cannot decode image \(DecompressionBombError: "):
        data.read_image(tmp_path / "big.png")   # a traceback before


# -------------------------------------------------------------------------------- iter_inputs
def test_iter_inputs_from_folder(tmp_path: Path):
    for i in range(3):
        write_image(tmp_path / f"{i}.jpg", 30, 60)
    m = declared_model((1, 3, 32, 32), (1, 252, 9))
    feeds = list(data.iter_inputs(tmp_path, m, limit=2, progress=False))
    assert len(feeds) == 2
    x = feeds[0]["images"]
    assert x.shape == (1, 3, 32, 32) and x.dtype == np.float32
    assert np.allclose(x[0, :, 0, 0], 114 / 255)                     # centred: top rows are padding
    assert np.allclose(x[0, :, 16, 16], np.array([200, 100, 50]) / 255, atol=2 / 255)


def test_iter_inputs_from_npy_and_npz(tmp_path: Path):
    m = declared_model((1, 3, 8, 8), (1, 252, 9))
    a = np.random.default_rng(0).random((4, 3, 8, 8)).astype(np.float64)
    np.save(tmp_path / "x.npy", a)
    feeds = data.load_calibration(tmp_path / "x.npy", m, limit=3, progress=False)
    assert len(feeds) == 3 and feeds[1]["images"].dtype == np.float32
    assert np.allclose(feeds[1]["images"][0], a[1])
    np.savez(tmp_path / "x.npz", first=a[:2], second=a[2])
    feeds = data.load_calibration(tmp_path / "x.npz", m, progress=False)
    assert len(feeds) == 3 and np.allclose(feeds[2]["images"][0], a[2])


def test_npy_wrong_channels_or_size_names_the_file(tmp_path: Path):
    m = declared_model((1, 3, 8, 8), (1, 252, 9))
    np.save(tmp_path / "gray.npy", np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(UsageError, match="gray.npy: tensors have 1 channels, model input 'images' expects 3"):
        data.load_calibration(tmp_path / "gray.npy", m, progress=False)
    np.save(tmp_path / "big.npy", np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(UsageError, match="big.npy: tensors are 16x16, model input 'images' expects 8x8"):
        data.load_calibration(tmp_path / "big.npy", m, progress=False)
    np.save(tmp_path / "flat.npy", np.zeros((3, 64), np.float32))
    with pytest.raises(UsageError, match="flat.npy: array of shape"):
        data.load_calibration(tmp_path / "flat.npy", m, progress=False)
    with pytest.raises(UsageError, match="none.npy: no such file"):
        data.load_calibration(tmp_path / "none.npy", m, progress=False)


def test_image_folder_for_one_channel_model_is_usage_error(tmp_path: Path):
    write_image(tmp_path / "a.png", 8, 8)
    m = declared_model((1, 1, 8, 8), (1, 252, 9))
    with pytest.raises(UsageError, match="expects 1 channels but images are RGB"):
        data.load_calibration(tmp_path, m, progress=False)


def test_a_channels_last_input_is_fed_transposed_images(tmp_path: Path):
    """tf2onnx keeps Keras's N x H x W x C input: images are preprocessed as for NCHW, then
    transposed; array files are taken in the model's own layout."""
    for i in range(3):
        write_image(tmp_path / f"{i}.png", 12, 10)
    nchw, nhwc = declared_model((1, 3, 8, 8), (1, 252, 9)), declared_model((1, 8, 8, 3), (1, 252, 9))
    assert data.channels_last(nhwc) and not data.channels_last(nchw)
    assert data.model_input(nhwc) == data.model_input(nchw) == ("images", (3, 8, 8))
    assert data.full_input_shape(nhwc, (3, 8, 8)) == (1, 8, 8, 3)
    assert data.full_input_shape(nchw, (3, 8, 8)) == (1, 3, 8, 8)
    assert data.feed_hw(np.zeros((2, 6, 8, 3))) == data.feed_hw(np.zeros((2, 3, 6, 8))) == (6, 8)
    ref = data.load_calibration(tmp_path, nchw, progress=False)
    for got in (data.load_calibration(tmp_path, nhwc, progress=False),
                list(data.iter_inputs(tmp_path, nhwc, progress=False))):
        assert len(got) == 3
        for a, b in zip(ref, got):
            assert b["images"].shape == (1, 8, 8, 3)
            assert np.array_equal(b["images"], a["images"].transpose(0, 2, 3, 1))
    arrays = tmp_path / "arrays"
    arrays.mkdir()
    np.save(arrays / "hwc.npy", np.concatenate([f["images"] for f in got]))
    back = data.load_calibration(arrays / "hwc.npy", nhwc, progress=False)
    assert np.array_equal(np.concatenate([f["images"] for f in back]), np.load(arrays / "hwc.npy"))
    np.save(arrays / "chw.npy", np.zeros((2, 3, 8, 8), np.float32))
    with pytest.raises(UsageError, match="chw.npy: tensors have 8 channels, model input 'images' expects 3"):
        data.load_calibration(arrays / "chw.npy", nhwc, progress=False)
    # a dynamic size, given in the model's own layout
    dyn = declared_model((1, "h", "w", 3), (1, 252, 9))
    assert data.model_input(dyn, (1, 16, 24, 3)) == ("images", (3, 16, 24))
    assert data.model_input(dyn, (16, 24)) == ("images", (3, 16, 24))


def test_calibration_folder_is_lazy_and_matches_eager(tmp_path):
    """load_calibration on a folder decodes on access and gives the same tensors as iter_inputs."""
    import numpy as np
    from PIL import Image

    import fixtures
    from onnxslim_yolo.data import ImageFeeds, iter_inputs, load_calibration

    model = fixtures.build_yolov5_v6(opset=13)
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (40 + i, 50, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    lazy = load_calibration(tmp_path, model, progress=False)
    assert isinstance(lazy, ImageFeeds) and len(lazy) == 3
    eager = list(iter_inputs(tmp_path, model, progress=False))
    for a, b in zip(lazy, eager):
        assert np.array_equal(a["images"], b["images"])
    assert len(lazy[:2]) == 2 and len(load_calibration(tmp_path, model, limit=2, progress=False)) == 2


def test_a_static_batch_model_gets_full_batches_of_images(tmp_path: Path):
    """A model exported with batch 2 is fed 2 images at a time; the last feed repeats its image."""
    values = [(10, 20, 30), (40, 50, 60), (70, 80, 90)]
    for i, v in enumerate(values):
        write_image(tmp_path / f"{i}.png", 8, 8, value=v)
    m = declared_model((2, 3, 8, 8), (2, 252, 9))
    assert data.model_batch(m) == 2 and data.model_batch(declared_model(("n", 3, 8, 8), (1, 2))) == 1
    assert data.model_batch(m, (4, 3, 8, 8)) == 4 and data.model_batch(m, (8, 8)) == 2
    for feeds in (data.load_calibration(tmp_path, m, progress=False),
                  list(data.iter_inputs(tmp_path, m, progress=False))):
        assert len(feeds) == 2 and all(f["images"].shape == (2, 3, 8, 8) for f in feeds)
        firsts = [f["images"][b, :, 4, 4] * 255 for f in feeds for b in range(2)]
        assert np.allclose(firsts, [values[0], values[1], values[2], values[2]], atol=1)
    np.save(tmp_path / "x.npy", np.arange(3 * 3 * 64, dtype=np.float32).reshape(3, 3, 8, 8))
    feeds = data.load_calibration(tmp_path / "x.npy", m, progress=False)
    assert [f["images"][:, 0, 0, 0].tolist() for f in feeds] == [[0.0, 192.0], [384.0, 384.0]]


def _normalising(ops: Sequence, elem_type: int = TensorProto.FLOAT,
                 extra_reader: bool = False) -> onnx.ModelProto:
    """images -> ops (op type, constant) in a chain -> output; ``extra_reader`` adds a second
    reader of the input."""
    nodes, inits, x = [], [], "images"
    for i, (op, value) in enumerate(ops):
        if op in ("Transpose", "Cast"):
            attrs = {"perm": [0, 3, 1, 2]} if op == "Transpose" else {"to": TensorProto.FLOAT}
            nodes.append(helper.make_node(op, [x], [f"t{i}"], **attrs))
        else:
            const = np.asarray(value, np.float32).reshape(-1, 1, 1)
            inits.append(onnx.numpy_helper.from_array(const, f"c{i}"))
            nodes.append(helper.make_node(op, [x, f"c{i}"], [f"t{i}"]))
        x = f"t{i}"
    outs = [helper.make_tensor_value_info(x, TensorProto.FLOAT, None)]
    if extra_reader:
        nodes.append(helper.make_node("Identity", ["images"], ["copy"]))
        outs.append(helper.make_tensor_value_info("copy", elem_type, None))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("images", elem_type, [1, 3, 8, 8])],
                          outs, inits)
    return helper.make_model_gen_version(g, opset_imports=[helper.make_opsetid("", 13)])


@pytest.mark.parametrize("ops, elem_type, extra, expected", [
    ([("Div", 255.0)], TensorProto.FLOAT, False, True),
    ([("Mul", 1 / 255)], TensorProto.FLOAT, False, True),
    ([("Transpose", None), ("Cast", None), ("Sub", [123.7, 116.3, 103.5]), ("Div", [58.4, 57.1, 57.4])],
     TensorProto.FLOAT, False, True),
    ([("Cast", None)], TensorProto.UINT8, False, True),
    ([("Sub", [0.485, 0.456, 0.406]), ("Div", [0.229, 0.224, 0.225])], TensorProto.FLOAT, False, False),
    ([("Mul", 2.0)], TensorProto.FLOAT, False, False),
    ([("Div", 255.0)], TensorProto.FLOAT, True, False),
])
def test_takes_pixels_reads_the_normalisation_in_the_graph(ops, elem_type, extra, expected):
    """Pixel values 0-255 are fed when the graph scales or centres them itself (or the input is
    uint8); not for a [0, 1] ImageNet normalisation, another factor, or a second reader."""
    model = _normalising(ops, elem_type, extra)
    assert data.takes_pixels(model) is expected
    scale = data.get_preset("yolov5", model).scale
    assert scale == (1.0 if expected else data.PRESETS["yolov5"].scale)


def test_array_files_that_are_no_arrays_or_hold_nan_are_one_line_errors(tmp_path: Path):
    """A .npz that is no zip raised BadZipFile; an all-NaN .npy calibrated a model with no INT8
    layer at all, exit 0."""
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04" + b"x" * 100)   # a zip's signature, then nothing of one
    with pytest.raises(UsageError, match=r"junk.npz: cannot read array file \(BadZipFile\)"):
        data._array_batches(junk)
    nan = tmp_path / "nan.npy"
    np.save(nan, np.full((2, 3, 8, 8), np.nan, np.float32))
    with pytest.raises(UsageError, match=r"nan.npy: holds NaN or infinite values"):
        data._array_batches(nan)
    ok = tmp_path / "ok.npz"
    np.savez(ok, a=np.zeros((2, 3, 8, 8), np.float32), b=np.ones((3, 8, 8), np.uint8))
    assert [a.shape for a in data._array_batches(ok)] == [(2, 3, 8, 8), (1, 3, 8, 8)]


@pytest.mark.parametrize("scale, warned", [(255.0, True), (1.0, False), (1 / 255, True)])
def test_array_values_unlike_the_models_preprocessing_are_warned_about(tmp_path: Path, caplog, scale: float,
                                                                       warned: bool):
    """Arrays of pixels 0-255 for a model fed pixels / 255 were taken as they were: the INT8
    model passed its own check and detected nothing on real images. Arrays 0-1 pass; 0-1/255 and
    0-255 warn, naming what the model's preprocessing gives."""
    from onnxslim_yolo.pass_base import WARNED

    model = fixtures.build_yolov5_v6(opset=13)
    path = tmp_path / f"x{scale:g}.npy"
    np.save(path, (np.random.default_rng(0).random((2, 3, 64, 64)) * scale).astype(np.float32))
    WARNED.clear()
    with caplog.at_level("WARNING"):
        feeds = list(data.iter_inputs(path, model, progress=False))
    assert len(feeds) == 2
    said = [r.getMessage() for r in caplog.records if "are these tensors preprocessed" in r.getMessage()]
    assert bool(said) is warned
    if warned:
        assert said[0].startswith(f"{path}: values span ") and "pixels / 255 (0-1)" in said[0]
        assert said[0].endswith("gives images 0 to 1: are these tensors preprocessed as the model expects?")


def test_sample_count_reads_no_image(monkeypatch):
    """The passes count their calibration images to warn about few: an image folder's feeds were
    decoded one by one to count them."""
    model_path, images, _ = fixtures.demo_paths()
    model = onnx.load(str(model_path))
    feeds = data.load_calibration(images, model, progress=False)
    listed = list(feeds)
    monkeypatch.setattr(data, "read_image", lambda *a: pytest.fail("an image was decoded to count it"))
    assert data.sample_count(feeds) == len(feeds.files) == data.sample_count(listed) > 0
    assert data.sample_count([{"x": np.zeros((2, 3, 4, 4))}, {"x": np.zeros((3, 3, 4, 4))}]) == 5


def _flipping(kind: str, channels_last: bool = False) -> onnx.ModelProto:
    """The yolov5 fixture behind a wrapper that reverses the image input's channels (``kind``),
    as a deployment wrapper for BGR frames does; NHWC uint8 through Cast and Transpose first."""
    from onnx import numpy_helper

    net = fixtures.build_yolov5_v6(opset=13)
    first = net.graph.input[0].name
    for n in net.graph.node:
        n.input[:] = ["net_in" if i == first else i for i in n.input]
    def c(name, v):
        net.graph.initializer.append(numpy_helper.from_array(np.asarray(v), name))
    x, nodes = "frame", []
    if channels_last:
        nodes += [helper.make_node("Cast", [x], ["cast"], to=TensorProto.FLOAT),
                  helper.make_node("Transpose", ["cast"], ["nchw"], perm=[0, 3, 1, 2])]
        x = "nchw"
    if kind == "gather":
        c("order", np.array([2, 1, 0], np.int64))
        nodes.append(helper.make_node("Gather", [x, "order"], ["flipped"], axis=1))
    elif kind == "slice":
        for name, v in (("st", [-1]), ("en", [-2 ** 63]), ("ax", [1]), ("sp", [-1])):
            c(name, np.array(v, np.int64))
        nodes.append(helper.make_node("Slice", [x, "st", "en", "ax", "sp"], ["flipped"]))
    elif kind == "split":
        nodes += [helper.make_node("Split", [x], ["r", "g", "b"], axis=1),
                  helper.make_node("Concat", ["b", "g", "r"], ["flipped"], axis=1)]
    else:   # "same": a Gather that keeps the order
        c("order", np.array([0, 1, 2], np.int64))
        nodes.append(helper.make_node("Gather", [x, "order"], ["flipped"], axis=1))
    c("k", np.float32(255.0 if channels_last else 1.0))
    nodes.append(helper.make_node("Div", ["flipped", "k"], ["net_in"]))
    dims = list(data.image_inputs(net)[first])
    shape = [dims[0], dims[2], dims[3], 3] if channels_last else dims
    elem = TensorProto.UINT8 if channels_last else TensorProto.FLOAT
    g = net.graph
    nodes += list(g.node)
    del g.node[:], g.input[:]
    g.node.extend(nodes)
    g.input.append(helper.make_tensor_value_info("frame", elem, shape))
    onnx.checker.check_model(net)
    return net


@pytest.mark.parametrize("kind, channels_last, flips", [
    ("gather", False, True), ("slice", False, True), ("split", False, True), ("gather", True, True),
    ("slice", True, True), ("same", False, False)])
def test_a_channel_reversal_in_the_graph_swaps_the_colour_order_fed(tmp_path: Path, kind, channels_last,
                                                                    flips):
    """A wrapper taking BGR frames for an RGB network was fed RGB: the network saw its channels
    reversed (yolov5n 0.3107 for 0.3571). Fed BGR, the wrapper gives the network's own outputs."""
    from onnxslim_yolo.evaluate import detections

    model = _flipping(kind, channels_last)
    assert data.flips_channels(model) is flips
    preset = data.get_preset("yolov5", model)
    assert preset.rgb is not flips and "BGR" in data.describe_preset(preset) if flips else preset.rgb
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    plain, wrapped = (detections(m, tmp_path, preset="yolov5", progress=False, threads=1)[0]
                      for m in (fixtures.build_yolov5_v6(opset=13), model))
    if flips:
        assert len(plain) > 0 and np.allclose(wrapped.boxes, plain.boxes, atol=1e-3)
        assert np.allclose(wrapped.scores, plain.scores, atol=1e-4)
