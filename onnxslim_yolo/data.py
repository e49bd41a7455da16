"""Image loading and YOLO preprocessing presets, for calibration and evaluation.

Images are decoded with Pillow (no OpenCV). The letterbox follows the ultralytics convention;
the resize uses Pillow's BILINEAR filter, which antialiases when shrinking and so sits between
``cv2.INTER_LINEAR`` and ``cv2.INTER_AREA`` (what yolov5's val loader uses when downscaling):
pixel values differ slightly from an OpenCV pipeline, mAP agrees to about 0.001.
"""
from __future__ import annotations

import ast
import logging
import zipfile
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import onnx
from onnx import numpy_helper
from PIL import Image, ImageOps, UnidentifiedImageError

from . import ir
from .pass_base import WARNED, PreconditionError, UsageError, warn_once
from .progress import bar

if TYPE_CHECKING:
    from .check.index import GraphIndex

log = logging.getLogger(__name__)

#: what an image folder is read for (ultralytics' IMG_FORMATS that Pillow decodes without plugins)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".mpo")
#: EXIF's Orientation tag: 2-8 ask for the image to be turned or mirrored before it is shown
EXIF_ORIENTATION = 0x0112
#: the pixel count above which an image is refused (Pillow's own limit, 89 Mpx, refused 14000x14000
#: aerial tiles): OpenCV's, which ultralytics reads with
MAX_PIXELS = 1 << 30
ARRAY_SUFFIXES = (".npy", ".npz")
#: spatial size used when the model input has symbolic height/width and nothing else says
DEFAULT_SIZE = 640
PathLike = Union[str, Path]
Feeds = Dict[str, np.ndarray]


@dataclass(frozen=True)
class Preset:
    """How a family of YOLO exports wants its input: channel order, scale, padding placement."""

    name: str
    rgb: bool
    scale: float
    center: bool
    pad_value: int = 114
    #: per-channel mean and standard deviation subtracted and divided after the scale (ImageNet
    #: normalisation), in the preset's channel order; None for none
    mean: Optional[Tuple[float, float, float]] = None
    std: Optional[Tuple[float, float, float]] = None
    #: resized to the input size without keeping the aspect ratio (no padding), as PaddleDetection,
    #: FastestDet and YOLO-FastestV2 feed their models
    stretch: bool = False


PRESETS: Dict[str, Preset] = {
    "yolov5": Preset("yolov5", rgb=True, scale=1 / 255, center=True),
    "yolov8": Preset("yolov8", rgb=True, scale=1 / 255, center=True),
    "yolov6": Preset("yolov6", rgb=True, scale=1 / 255, center=True),
    "yolox": Preset("yolox", rgb=False, scale=1.0, center=False),
    # PP-PicoDet is trained on ImageNet-normalised images
    "imagenet": Preset("imagenet", rgb=True, scale=1 / 255, center=True, mean=(0.485, 0.456, 0.406),
                       std=(0.229, 0.224, 0.225)),
    # NanoDet-Plus: the same normalisation on BGR images (its mean 103.53, 116.28, 123.675 in 0-255)
    "nanodet": Preset("nanodet", rgb=False, scale=1 / 255, center=True, mean=(0.406, 0.456, 0.485),
                      std=(0.225, 0.224, 0.229)),
    # FastestDet, YOLO-FastestV2: OpenCV's BGR images over 255, stretched to the input size
    "fastestdet": Preset("fastestdet", rgb=False, scale=1 / 255, center=True, stretch=True),
    # PaddleDetection's detectors stretch their images too: PP-YOLOE+ and RT-DETR over 255, PP-YOLOE
    # (v1), PP-YOLO and PicoDet ImageNet-normalised
    "paddle": Preset("paddle", rgb=True, scale=1 / 255, center=True, stretch=True),
    "paddle-imagenet": Preset("paddle-imagenet", rgb=True, scale=1 / 255, center=True,
                              mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), stretch=True),
    # mmdet's RTMDet: the same, padded at the bottom and right (its Pad after a kept-ratio Resize)
    "mmdet": Preset("mmdet", rgb=False, scale=1 / 255, center=False, mean=(0.406, 0.456, 0.485),
                    std=(0.225, 0.224, 0.229)),
}


#: input pixels per original pixel: one ratio for both axes (letterbox) or (x, y) (stretched)
Ratio = Union[float, Tuple[float, float]]


def ratio_xy(ratio: Ratio) -> Tuple[float, float]:
    """(x, y) of a :data:`Ratio`."""
    return (float(ratio[0]), float(ratio[1])) if isinstance(ratio, tuple) else (float(ratio), float(ratio))


@dataclass(frozen=True)
class Meta:
    """Where a preprocessed image came from and how to map boxes back to it."""

    path: Path
    orig_hw: Tuple[int, int]
    ratio: Ratio  # input pixels per original pixel: one for both axes, or (x, y) when stretched
    pad: Tuple[int, int]  # (left, top) in input pixels


# ------------------------------------------------------------------------------------ images
def _is_image(f: Path) -> bool:
    """An image file by its suffix; macOS's ``._NAME`` resource forks, copied beside the images
    they describe, are none."""
    return f.suffix.lower() in IMAGE_SUFFIXES and not f.name.startswith("._") and f.is_file()


def list_images(folder: PathLike) -> List[Path]:
    """The images (``IMAGE_SUFFIXES``) directly inside ``folder``, sorted by name. Images in its
    sub-folders are not read (their labels would be looked for in the one labels folder): a
    warning counts them, and the error for a folder without images of its own names them."""
    p = Path(folder)
    if not p.exists():
        raise UsageError(f"{p}: image folder does not exist")
    if not p.is_dir():
        raise UsageError(f"{p}: not a folder (expected a folder of images)")
    files = sorted(f for f in p.iterdir() if _is_image(f))
    if files and ("looked", p.resolve()) in WARNED:   # once per folder: a run lists it several times
        return files
    nested = sum(1 for d in p.iterdir() if d.is_dir() for f in d.rglob("*") if _is_image(f))
    if not files:
        more = f"; {nested} are in its sub-folders, which are not read: pass one of them" if nested else ""
        if not nested and any(f.suffix.lower() in ARRAY_SUFFIXES for f in p.iterdir()):
            more = "; input arrays are read from one .npy or .npz file, not a folder of them"
        raise UsageError(f"{p}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}){more}")
    WARNED.add(("looked", p.resolve()))
    if nested:
        log.warning("%s: %d images in its sub-folders are not read (only the %d beside them)", p, nested,
                    len(files))
    return files


def _orientation(im: "Image.Image", path: Path) -> int:
    """The EXIF orientation of ``im``; 1 (as stored) when its EXIF block cannot be read: the
    pixels are fine, and OpenCV, which ultralytics reads with, ignores a broken block too."""
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1))
    except Exception as exc:   # Pillow raises SyntaxError, ValueError, struct.error, ...
        warn_once(log, ("exif", str(path)), "%s: EXIF block unreadable (%s); the image is used as stored",
                  path, type(exc).__name__)
        return 1


def read_image(path: PathLike) -> np.ndarray:
    """HxWx3 uint8 RGB, as ultralytics reads it with OpenCV: turned as its EXIF orientation says
    (a phone photo is labelled as it is shown; since 2026-12-06, it was used as stored), 16-bit
    images scaled to 8 bits (Pillow clipped them: all white), grayscale, palette and RGBA images
    converted to RGB (alpha dropped)."""
    p = Path(path)
    bomb, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, MAX_PIXELS   # an aerial tile, not a bomb
    try:
        with Image.open(p) as im:
            if _orientation(im, p) in range(2, 9):
                im = ImageOps.exif_transpose(im)
            im.load()
            if im.mode.startswith("I"):   # 16-bit grayscale (I;16*, or I past 255): the high byte
                v = np.asarray(im).astype(np.int64)
                wide = im.mode != "I" or v.max(initial=0) > 255
                im = Image.fromarray(((v >> 8) if wide else v).clip(0, 255).astype(np.uint8))
            elif im.mode == "F":
                raise UsageError(f"{p}: a 32-bit float image; expected 8 or 16 bits per channel")
            if im.mode != "RGB":
                im = im.convert("RGB")
            arr = np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise UsageError(f"{p}: no such image") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        empty = p.is_file() and p.stat().st_size == 0
        said = (str(exc).splitlines() or [""])[0]
        why = ("an empty file" if empty else type(exc).__name__ if isinstance(exc, UnidentifiedImageError)
               or not said else f"{type(exc).__name__}: {said}")
        raise UsageError(f"{p}: cannot decode image ({why})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = bomb
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
        raise UsageError(f"{p}: decoded to shape {list(arr.shape)}, expected HxWx3")
    return arr


def letterbox(img: np.ndarray, size: Tuple[int, int], center: bool = True,
              pad_value: int = 114, stretch: bool = False) -> Tuple[np.ndarray, Ratio, Tuple[int, int]]:
    """Resize keeping the aspect ratio, then pad to ``size`` = (h, w).

    Returns ``(out, ratio, (pad_left, pad_top))``. Ultralytics rules: ``ratio = min(h/H, w/W)``,
    unpadded size ``round(W*ratio), round(H*ratio)``; when centred the padding is split with
    ``round(d - 0.1)`` before and ``round(d + 0.1)`` after; otherwise all padding goes right/bottom.
    With ``stretch`` the image is resized to ``size`` as it is, ratio (w/W, h/H), no padding.
    """
    h, w = int(size[0]), int(size[1])
    H, W = img.shape[:2]
    if stretch:
        out = img if (W, H) == (w, h) else np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
        return out, (w / W, h / H), (0, 0)
    r = min(h / H, w / W)
    nw, nh = max(1, int(round(W * r))), max(1, int(round(H * r)))   # a 2000x1 sliver keeps a row
    if (nw, nh) != (W, H):
        img = np.asarray(Image.fromarray(img).resize((nw, nh), Image.BILINEAR))
    dw, dh = (w - nw) / 2, (h - nh) / 2
    if center:
        left, top = int(round(dw - 0.1)), int(round(dh - 0.1))
    else:
        left, top = 0, 0
    out = np.full((h, w, img.shape[2]), pad_value, dtype=img.dtype)
    out[top:top + nh, left:left + nw] = img[:h - top, :w - left]
    return out, r, (left, top)


def preprocess(img: np.ndarray, preset: Preset, size: Tuple[int, int],
               path: Optional[Path] = None) -> Tuple[np.ndarray, Meta]:
    """RGB HxWx3 uint8 -> CHW float32 per ``preset``, plus the :class:`Meta` to undo it."""
    out, r, pad = letterbox(img, size, preset.center, preset.pad_value, preset.stretch)
    if not preset.rgb:
        out = out[:, :, ::-1]
    chw = np.ascontiguousarray(out.transpose(2, 0, 1), dtype=np.float32)
    if preset.scale != 1.0:
        chw *= np.float32(preset.scale)
    if preset.mean is not None and preset.std is not None:
        chw -= np.asarray(preset.mean, np.float32)[:, None, None]
        chw /= np.asarray(preset.std, np.float32)[:, None, None]
    return chw, Meta(Path(path) if path else Path(), (int(img.shape[0]), int(img.shape[1])), r, pad)


# ------------------------------------------------------------------------------------ models
def detect_preset(model: onnx.ModelProto) -> str:
    """The preset name for ``model`` (:func:`preset_choice`)."""
    return preset_choice(model)[0]


def preset_choice(model: onnx.ModelProto) -> Tuple[str, str]:
    """(preset name, what chose it) for ``model``: the exporter (metadata; any ultralytics task
    is preprocessed like its detector), then the output layout, else yolov5. A row per grid point
    is YOLOX's layout, unless the objectness column is a constant 1: YOLOX has an objectness
    branch, meituan YOLOv6 fills the column with ones (:func:`ones_objectness`). A GFL head's
    rows (PP-PicoDet: :func:`.eval.dfl.gfl_rows`) get ImageNet normalisation, NanoDet-Plus's one
    output (``gfl``) the same on BGR images, RTMDet's raw maps (box distances in pixels) mmdet's
    (the same, padded at the bottom and right), FastestDet's and YOLO-FastestV2's maps BGR over 255."""
    from .eval.decode import declared_shapes, detect_format, exporter_family  # decode does not import data
    from .eval.dfl import DISTANCES, dfl_layout, gfl_rows
    from .eval.fastest import head_kind
    family = exporter_family(model)[0]
    fmt = family or detect_format(model)
    why = ("the exporter named in the model's metadata" if family else
           f"the output layout, read as {fmt}" if fmt not in (None, "v5")
           else "the default: nothing in the model names another family")
    if fmt == "yolox" and ones_objectness(model):
        return "yolov6", "the output layout: a row per grid point, objectness a constant 1"
    # PaddleDetection: stretched; GFL rows are PicoDet's, ImageNet-normalised. A model whose
    # metadata names its exporter is that exporter's, whatever inputs were added to it
    if aux_inputs(model) and not family:
        if fmt == "v8" and gfl_rows(declared_shapes(model)):
            return "paddle-imagenet", "PaddleDetection's scale_factor input and GFL distance bins per row"
        return "paddle", "PaddleDetection's scale_factor input"
    if fmt == "v8" and gfl_rows(declared_shapes(model)):
        return "imagenet", "the output layout: GFL distance bins per row"
    fastest = head_kind(model)
    if (fastest, fmt) in (("fastestdet", "v8"), ("yolo-fastestv2", "v5")):
        return "fastestdet", ("the output layout: FastestDet's map" if fastest == "fastestdet"
                              else "the output layout: YOLO-FastestV2's maps")
    if fmt == "v8" and (dfl_layout(declared_shapes(model)) or (0,))[0] == DISTANCES:
        return "mmdet", "the output layout: RTMDet's box distance maps"
    if fmt == "gfl":
        return "nanodet", why
    return {"v8": "yolov8", "yolox": "yolox"}.get(fmt, "yolov5"), why


def describe_preset(preset: Preset) -> str:
    """One line on what ``preset`` feeds: colour order, pixel scale, normalisation, letterbox."""
    pixels = ("pixel values 0-255" if preset.scale == 1.0 else "pixels / 255 (0-1)"
              if abs(preset.scale - 1 / 255) < 1e-9 else f"pixels x {preset.scale:.6g}")
    if preset.mean is not None:
        pixels += ", minus the ImageNet mean, over its std"
    fit = ("stretched to the input" if preset.stretch
           else f"letterbox {'centred' if preset.center else 'top-left'}")
    return f"{preset.name}: {'RGB' if preset.rgb else 'BGR'}, {pixels}, {fit}"


#: ops that pass a tensor of ones on as ones (a broadcast, a reshape, a cast)
_KEEPS_ONES = frozenset({"Expand", "Tile", "Reshape", "Unsqueeze", "Cast", "Identity"})


def ones_objectness(model: onnx.ModelProto) -> bool:
    """Whether the first output is a Concat on its last axis whose column 4 (objectness, after
    the 4 box values) is a constant 1: an initializer or Constant of ones, a ConstantOfShape of
    value 1 (a dynamic-batch export), possibly broadcast by Expand or Tile."""
    from .check.index import GraphIndex, attr  # check imports data's callers: import when used

    idx = GraphIndex(model)
    out = idx.outputs[0] if idx.outputs else ""
    i = idx.producer.get(out)
    if i is None or idx.nodes[i].op_type != "Concat":
        return False
    node = idx.nodes[i]
    if not any(_is_ones(idx, t) for t in node.input[1:]):
        return False  # before any shape inference: most models stop here
    from .eval.decode import value_dims  # decode does not import data: no cycle

    shapes = {v.name: value_dims(v) for v in ir.inferred_values(model)}
    out_dims = shapes.get(out) or [None]
    if len(out_dims) < 2 or out_dims[-1] is None or attr(node, "axis") not in (-1, len(out_dims) - 1):
        return False
    widths = [(shapes.get(t) or [None])[-1] for t in node.input]
    if widths.count(None) == 1:  # a ConstantOfShape's shape is known only from its data
        widths[widths.index(None)] = out_dims[-1] - sum(w for w in widths if w is not None)
    column = 0
    for t, w in zip(node.input, widths):
        if column == 4:
            return w == 1 and _is_ones(idx, t)
        if w is None:
            return False
        column += w
    return False


def _is_ones(idx: "GraphIndex", tensor: str, depth: int = 0) -> bool:
    value = idx.const(tensor)
    if value is not None:
        return value.size > 0 and bool(np.all(value == 1))
    i = idx.producer.get(tensor)
    if i is None or depth > 4:
        return False
    node = idx.nodes[i]
    if node.op_type == "ConstantOfShape":
        fill = next((a.t for a in node.attribute if a.name == "value"), None)
        return fill is not None and bool(np.all(numpy_helper.to_array(fill) == 1))
    return node.op_type in _KEEPS_ONES and _is_ones(idx, node.input[0], depth + 1)


def get_preset(name: Optional[str], model: onnx.ModelProto) -> Preset:
    """The named (or detected) preset. A model that takes pixel values (:func:`takes_pixels`) is
    fed them: the preset's scale becomes 1. Scaled to [0, 1] first, a uint8 input would read 0 or
    1 everywhere, and a graph that divides by 255 itself would see a nearly black image."""
    if name is None:
        name = detect_preset(model)
        log.info("preprocessing preset: %s (detected)", name)
    if name not in PRESETS:
        raise UsageError(f"unknown preprocessing preset '{name}'; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    from .check.index import GraphIndex  # check imports data's callers: import when used

    idx = GraphIndex(model)   # one index for both questions below
    if preset.scale != 1.0 and takes_pixels(model, idx):
        log.info("the model normalises its image input itself: fed pixel values 0-255")
        preset = replace(preset, scale=1.0, mean=None, std=None)
    if flips_channels(model, idx):
        log.info("the model reverses its input's colour channels itself: fed %s",
                 "BGR" if preset.rgb else "RGB")
        preset = replace(preset, rgb=not preset.rgb)
    return preset


#: ops between an image input and its normalisation that leave the values as they are
_LAYOUT_OPS = frozenset({"Transpose", "Cast", "Identity", "Reshape", "Unsqueeze", "Squeeze"})


def takes_pixels(model: onnx.ModelProto, idx: Optional["GraphIndex"] = None) -> bool:
    """Whether the single image input takes pixel values 0-255: an integer tensor (uint8), or a
    graph whose first arithmetic on the input (past layout ops and Casts) divides it by 50 or more,
    multiplies it by 0.02 or less, or subtracts a mean in pixel units (Keras' Rescaling and
    Normalization layers, end-to-end exports). ``idx``: the model's GraphIndex, when built."""
    from .check.index import GraphIndex  # check imports data's callers: import when used

    idx = GraphIndex(model) if idx is None else idx
    if len(idx.inputs) != 1:
        return False
    name = idx.inputs[0]
    if np.issubdtype(ir.input_dtypes(model).get(name, np.dtype(np.float32)), np.integer):
        return True
    for _ in range(len(_LAYOUT_OPS) + 1):
        users = set(idx.consumer_nodes(name))
        if len(users) != 1:
            return False
        node = idx.nodes[users.pop()]
        if node.op_type in _LAYOUT_OPS and node.input[0] == name:
            name = node.output[0]
            continue
        other = [i for i in node.input if i != name]
        if node.op_type not in ("Div", "Mul", "Sub", "Add") or len(other) != 1:
            return False
        value = idx.const(other[0])  # only now: the other input of a Conv would be its weights
        if value is None or value.size == 0:
            return False
        v = np.abs(value.astype(np.float64))
        if node.op_type == "Div":
            return node.input[0] == name and float(v.min()) >= 50.0
        if node.op_type == "Mul":
            return 0.0 < float(v.max()) <= 0.02
        return float(v.max()) > 2.0
    return False


#: ops between an image input and a channel reversal that keep each channel's values apart
_PER_CHANNEL_OPS = frozenset({"Cast", "Identity", "Div", "Mul", "Sub", "Add"})


def flips_channels(model: onnx.ModelProto, idx: Optional["GraphIndex"] = None) -> bool:
    """Whether the single image input's colour channels are reversed in the graph before anything
    mixes them (a deployment wrapper taking BGR frames for an RGB network, or the other way): a
    Gather of channels [2, 1, 0], a Slice of step -1 over the channel axis, or a Split into the
    three channels joined again in reverse order, reached through layout ops (Transpose moves
    the channel axis) and per-channel arithmetic. The preset's colour order is then swapped
    (:func:`get_preset`): fed as the network expects, it would see its channels reversed (yolov5n
    behind such a wrapper scored 0.3107 for 0.3571). ``idx``: the model's GraphIndex, when built."""
    from .check.index import GraphIndex, attr  # check imports data's callers: import when used

    idx = GraphIndex(model) if idx is None else idx
    shapes = image_inputs(model)
    if len(shapes) != 1:
        return False
    name = next(iter(shapes))
    axis = 3 if _channels_last(shapes[name]) else 1
    for _ in range(16):
        users = idx.consumer_nodes(name)
        if len(users) != 1:
            return False
        node = idx.nodes[users[0]]
        op = node.op_type
        if op in _PER_CHANNEL_OPS:
            name = node.output[0]
            continue
        if node.input[0] != name:
            return False
        if op == "Transpose":
            perm = list(attr(node, "perm") or [])
            if axis not in perm:
                return False
            axis, name = perm.index(axis), node.output[0]
            continue
        if op == "Gather":
            picked = idx.const(node.input[1]) if len(node.input) > 1 else None
            return attr(node, "axis", 0) in (axis, axis - 4) and picked is not None and \
                picked.reshape(-1).tolist() in ([2, 1, 0], [-1, -2, -3])
        if op == "Slice":
            return _reverses(idx, node, axis)
        return op == "Split" and _split_reversed(idx, node, axis)
    return False


def _reverses(idx: "GraphIndex", node: onnx.NodeProto, axis: int) -> bool:
    """A Slice (opset 10+, by inputs) that reverses the three channels on ``axis``: step -1 from
    the last channel (-1, 2 or past it) to before the first (-4 or below)."""
    vals = [idx.const(i) if i else None for i in list(node.input[1:5])] + [None] * 4
    if vals[0] is None or vals[1] is None or vals[3] is None:
        return False
    starts, ends, steps = (v.reshape(-1) for v in (vals[0], vals[1], vals[3]))
    axes = vals[2].reshape(-1) if vals[2] is not None else np.arange(len(starts))
    for s, e, a, k in zip(starts, ends, axes, steps):
        if int(a) in (axis, axis - 4):
            return int(k) == -1 and (int(s) == -1 or int(s) >= 2) and int(e) <= -4
    return False


def _split_reversed(idx: "GraphIndex", node: onnx.NodeProto, axis: int) -> bool:
    """A Split into the three channels on ``axis`` whose parts one Concat on that axis joins in
    reverse order."""
    from .check.index import attr

    if attr(node, "axis", 0) not in (axis, axis - 4) or len(node.output) != 3:
        return False
    readers = [idx.consumer_nodes(o) for o in node.output]
    if any(len(r) != 1 for r in readers) or len({r[0] for r in readers}) != 1:
        return False
    cat = idx.nodes[readers[0][0]]
    return cat.op_type == "Concat" and attr(cat, "axis", 0) in (axis, axis - 4) and \
        list(cat.input) == list(node.output)[::-1]


def metadata_imgsz(model: onnx.ModelProto) -> Optional[Tuple[int, int]]:
    """The (h, w) an Ultralytics export names in its ``imgsz`` metadata, if any."""
    for p in model.metadata_props:
        if p.key == "imgsz":
            try:
                v = ast.literal_eval(p.value)
            except (ValueError, SyntaxError):
                return None
            v = [v, v] if isinstance(v, int) else list(v)
            if len(v) == 2 and all(isinstance(x, int) and x > 0 for x in v):
                return int(v[0]), int(v[1])
    return None


def _channels_last(dims: Sequence) -> bool:
    """A rank-4 image input whose last dim is 3 and whose axis 1 is not: N x H x W x C (tf2onnx
    keeps Keras's layout unless told ``--inputs-as-nchw``)."""
    return len(dims) == 4 and dims[3] == 3 and dims[1] != 3


#: inputs PaddleDetection's exports take beside the image, each (N, 2): ``scale_factor``, the
#: resized over the original size (y, x), which its post-processing divides the boxes by, and
#: ``im_shape``, the resized image's height and width. Calibration, evaluation and the checks feed
#: 1 and the input's own size, so the boxes stay in input pixels, where the evaluator reads them.
AUX_INPUTS = ("scale_factor", "im_shape")


def aux_inputs(model: onnx.ModelProto) -> Dict[str, np.dtype]:
    """The :data:`AUX_INPUTS` a model takes (by name, of shape (N, 2)) and their dtypes."""
    dtypes = ir.input_dtypes(model)
    return {name: dtypes[name] for name, dims in ir.input_shapes(model).items()
            if name in AUX_INPUTS and len(dims) == 2 and dims[1] == 2}


def image_inputs(model: onnx.ModelProto) -> Dict[str, Tuple]:
    """Graph inputs (with their dims) other than the :func:`aux_inputs`."""
    aux = aux_inputs(model)
    return {name: dims for name, dims in ir.input_shapes(model).items() if name not in aux}


def aux_value(name: str, hw: Sequence[int]) -> List[int]:
    """What :func:`add_aux` feeds the :data:`AUX_INPUTS` ``name`` for an image of size ``hw``:
    scale factor 1 (y, x), or that size (h, w)."""
    return [1, 1] if name == "scale_factor" else [int(hw[0]), int(hw[1])]


def add_aux(feed: Feeds, image: str, aux: Optional[Mapping[str, np.dtype]]) -> Feeds:
    """``feed`` with the :func:`aux_inputs` added for its image (:func:`aux_value`)."""
    x = feed[image]
    hw = feed_hw(x)
    for name, dtype in (aux or {}).items():
        feed[name] = np.tile(np.asarray(aux_value(name, hw), dtype), (x.shape[0], 1))
    return feed


def channels_last(model: onnx.ModelProto) -> bool:
    """Whether the single image input is channels-last (NHWC): feeds are then transposed."""
    shapes = image_inputs(model)
    return len(shapes) == 1 and _channels_last(next(iter(shapes.values())))


def feed_hw(feed: np.ndarray) -> Tuple[int, int]:
    """(H, W) of a rank-4 image feed, NCHW or NHWC (:func:`_channels_last`, read off the feed's own
    shape, so that it holds for a model with more inputs than the image too)."""
    s = feed.shape
    return (int(s[1]), int(s[2])) if _channels_last(s) else (int(s[2]), int(s[3]))


def model_input(model: onnx.ModelProto,
                input_shape: Optional[Sequence[int]] = None) -> Tuple[str, Tuple[int, int, int]]:
    """(name, (C, H, W)) of the single image input, NCHW or NHWC (:func:`channels_last`), beside
    which only :func:`aux_inputs` may be. ``input_shape`` is (H, W) or the full input shape in the
    model's layout."""
    shapes = image_inputs(model)
    if len(shapes) != 1:
        aux = " or ".join(f"{n} (N, 2)" for n in AUX_INPUTS)
        raise UsageError(f"expected a model with one image input (beside it only {aux}), found "
                         f"{len(shapes)}: {list(shapes)}")
    name, dims = next(iter(shapes.items()))
    if len(dims) != 4:
        raise UsageError(f"input '{name}' has rank {len(dims)} {list(dims)}; expected NCHW or NHWC")
    last = _channels_last(dims)
    cdim, hw_dims = (dims[3], dims[1:3]) if last else (dims[1], dims[2:])
    c = cdim if isinstance(cdim, int) and cdim > 0 else 3
    if input_shape is not None:
        given = tuple(int(x) for x in input_shape)
        hw = given[1:3] if last and len(given) == 4 else given[-2:]
        full = list(given) if len(given) == len(dims) else [d if isinstance(d, int) and d > 0 else 1
                                                            for d in dims]
        at = 1 if last else 2
        full[at:at + 2] = hw
        ir.overridden(name, dims, tuple(full))   # agrees with every fixed dim (eval ran into onnxruntime)
    elif all(isinstance(d, int) and d > 0 for d in hw_dims):
        hw = (int(hw_dims[0]), int(hw_dims[1]))
    else:
        hw = metadata_imgsz(model) or (DEFAULT_SIZE, DEFAULT_SIZE)
        log.info("input '%s' has dynamic size %s: using %dx%d", name, list(dims), *hw)
    return name, (int(c), int(hw[0]), int(hw[1]))


def full_input_shape(model: onnx.ModelProto, chw: Tuple[int, int, int], n: int = 1) -> Tuple[int, ...]:
    """The image input's whole shape for ``n`` samples of ``chw``, in the model's layout."""
    c, h, w = chw
    return (n, h, w, c) if channels_last(model) else (n, c, h, w)


def dynamic_input_shape(model: onnx.ModelProto) -> Optional[Tuple[int, ...]]:
    """For an image input of symbolic size: its whole shape at the size the metadata names (else
    640), where `check` runs it and `inspect` counts its MACs; None when the shape is static (a
    symbolic batch alone runs as 1). Raises UsageError when no single image input is found."""
    try:
        ir.static_input_shapes(model)
        return None
    except PreconditionError:
        return full_input_shape(model, model_input(model)[1])


def to_layout(batch: np.ndarray, last: bool) -> np.ndarray:
    """An N x C x H x W batch in the model's layout (N x H x W x C when ``last``)."""
    return np.ascontiguousarray(batch.transpose(0, 2, 3, 1)) if last else batch


def model_batch(model: onnx.ModelProto, input_shape: Optional[Sequence[int]] = None) -> int:
    """Images per run: N of an (N, C, H, W) ``input_shape``, else the image input's fixed batch
    (an export with a static batch of 4 takes 4 images at once), else 1."""
    if input_shape is not None and len(input_shape) == 4:
        return max(int(input_shape[0]), 1)
    dims = next(iter(image_inputs(model).values()), ())
    n = dims[0] if len(dims) else 1
    return int(n) if isinstance(n, (int, np.integer)) and n > 1 else 1


def groups(items: Sequence, n: int) -> List[list]:
    """Consecutive groups of ``n`` items; the last group is filled up by repeating its last item
    (a static-batch model needs full batches; callers drop what the filler gave)."""
    out = [list(items[i:i + n]) for i in range(0, len(items), n)]
    if out and len(out[-1]) < n:
        out[-1] += [out[-1][-1]] * (n - len(out[-1]))
    return out


# ---------------------------------------------------------------------------------- iterators
def image_stems(folder: PathLike, limit: Optional[int] = None) -> List[str]:
    """File stems of the images :func:`iter_images` reads (the first ``limit`` by name)."""
    return [f.stem for f in list_images(folder)[:limit or None]]


def iter_images(folder: PathLike, preset: Preset, size: Tuple[int, int], limit: Optional[int] = None,
                progress: bool = True, desc: str = "images") -> Iterator[Tuple[np.ndarray, Meta]]:
    """(CHW float32, Meta) for each image in ``folder`` (first ``limit`` by name)."""
    files = list_images(folder)[:limit] if limit else list_images(folder)
    for f in bar(files, total=len(files), desc=desc, enabled=progress):
        yield preprocess(read_image(f), preset, size, f)


def _array_batches(path: Path) -> List[np.ndarray]:
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = [z[k] for k in z.files]
        else:
            arrays = [np.load(path, allow_pickle=False)]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:   # a .npz that is no zip: BadZipFile
        raise UsageError(f"{path}: cannot read array file ({type(exc).__name__})") from None
    if not arrays:
        raise UsageError(f"{path}: contains no arrays")
    out = []
    for a in arrays:
        if a.ndim == 3:
            a = a[None]
        if a.ndim != 4:
            raise UsageError(f"{path}: array of shape {list(a.shape)}; expected NCHW or CHW tensors")
        if not np.issubdtype(a.dtype, np.number):
            raise UsageError(f"{path}: array of dtype {a.dtype}; expected numbers")
        if not np.isfinite(a).all():
            raise UsageError(f"{path}: holds NaN or infinite values; calibration needs real inputs")
        out.append(a)
    return out


def _iter_arrays(path: Path, name: str, chw: Tuple[int, int, int], dtype: np.dtype,
                 limit: Optional[int], progress: bool, batch: int = 1, last: bool = False,
                 aux: Optional[Mapping[str, np.dtype]] = None, expected: Optional[Preset] = None
                 ) -> Iterator[Feeds]:
    """Feeds from an array file whose tensors are in the model's layout (NHWC when ``last``), with
    the model's ``aux`` inputs (:func:`add_aux`); a warning when their values do not look like
    what the ``expected`` preprocessing gives."""
    batches = _array_batches(path)
    if expected is not None:
        _warn_array_range(path, batches, expected)
    for a in batches:
        c, hw = (a.shape[3], a.shape[1:3]) if last else (a.shape[1], a.shape[2:])
        if c != chw[0]:
            raise UsageError(f"{path}: tensors have {c} channels, model input '{name}' "
                             f"expects {chw[0]}")
        if tuple(hw) != chw[1:]:
            raise UsageError(f"{path}: tensors are {hw[0]}x{hw[1]}, model input '{name}' "
                             f"expects {chw[1]}x{chw[2]}")
    samples = [a[i:i + 1] for a in batches for i in range(a.shape[0])]
    samples = samples[:limit] if limit else samples
    for g in bar(groups(samples, batch), total=-(-len(samples) // batch), desc="tensors", enabled=progress):
        yield add_aux({name: np.ascontiguousarray(np.concatenate(g), dtype=dtype)}, name, aux)


def _preset_range(p: Preset) -> Tuple[float, float]:
    """The smallest and largest value ``p`` gives a pixel (0 to 255 through its scale, mean, std)."""
    ends = np.array([0.0, 255.0]) * p.scale
    if p.mean is not None and p.std is not None:
        ends = (ends[:, None] - np.asarray(p.mean)) / np.asarray(p.std)
    return float(np.min(ends)), float(np.max(ends))


def _warn_array_range(src: Path, values: Sequence[np.ndarray], p: Preset) -> None:
    """A warning when an array file's values span far more or far less than the model's
    preprocessing ``p`` gives images (arrays of pixels 0-255 for a model fed pixels / 255 were
    taken as they were: the INT8 model passed its own check and detected nothing on real images)."""
    lo, hi = _preset_range(p)
    got_lo, got_hi = min(float(a.min()) for a in values), max(float(a.max()) for a in values)
    span, got = hi - lo, got_hi - got_lo
    if got > 8 * span or 0 < got < span / 16:   # ImageNet-normalised arrays (span 4.7) for 0-1 pass
        warn_once(log, ("array range", str(src)),
                  "%s: values span %.4g to %.4g, where the model's preprocessing (%s) gives images %.4g to "
                  "%.4g: are these tensors preprocessed as the model expects?", src, got_lo, got_hi,
                  describe_preset(p), lo, hi)


def _require_rgb(src: Path, name: str, chw: Tuple[int, int, int]) -> None:
    if chw[0] != 3:
        raise UsageError(f"{src}: model input '{name}' expects {chw[0]} channels but images are RGB "
                         "(3 channels); pass preprocessed tensors as .npy/.npz instead")


def iter_inputs(source: PathLike, model: onnx.ModelProto, preset: Optional[str] = None,
                limit: Optional[int] = None, input_shape: Optional[Sequence[int]] = None,
                progress: bool = True) -> Iterator[Feeds]:
    """Feeds ``{input_name: NxCxHxW}`` (NxHxWxC for a channels-last input) from an image folder or
    a ``.npy``/``.npz`` of tensors, N = :func:`model_batch` images per feed (1 unless the model's
    batch is fixed).

    Array files hold already-preprocessed tensors in the model's layout (CHW / NCHW, or HWC / NHWC
    for a channels-last input); their channel count and spatial size must match the model input.
    Image folders need a 3-channel model input.
    """
    src = Path(source)
    name, chw = model_input(model, input_shape)
    dtype = ir.input_dtypes(model).get(name, np.dtype(np.float32))
    if src.suffix.lower() in ARRAY_SUFFIXES:
        if not src.is_file():
            raise UsageError(f"{src}: no such file")
        try:
            expected: Optional[Preset] = get_preset(preset, model)
        except UsageError:   # no preprocessing known: the arrays are taken as they are
            expected = None
        yield from _iter_arrays(src, name, chw, dtype, limit, progress, model_batch(model, input_shape),
                                channels_last(model), aux_inputs(model), expected)
        return
    _require_rgb(src, name, chw)
    p = get_preset(preset, model)
    files = list_images(src)[:limit] if limit else list_images(src)
    feeds = ImageFeeds(files, name, p, chw[1:], dtype, model_batch(model, input_shape), channels_last(model),
                       aux_inputs(model))
    for i in bar(range(len(feeds)), total=len(feeds), desc="images", enabled=progress):
        yield feeds[i]


class ImageFeeds(SequenceABC):
    """Feeds read from an image folder on access, so memory holds one feed, however many images
    there are. A feed holds ``batch`` images (the last one filled up by repeating its last image).

    Calibration walks the data several times (statistics, sensitivity, refits); decoding again
    costs a few milliseconds per image, keeping 128 preprocessed 640x640 inputs would cost 630 MB.
    """

    def __init__(self, files: Sequence[Path], name: str, preset: Preset, size: Tuple[int, int],
                 dtype: np.dtype, batch: int = 1, last: bool = False,
                 aux: Optional[Mapping[str, np.dtype]] = None) -> None:
        self.files, self.name, self.preset, self.size, self.dtype = list(files), name, preset, size, dtype
        self.groups = groups(self.files, batch)
        self.last, self.aux = last, dict(aux or {})

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        xs = [preprocess(read_image(f), self.preset, self.size, f)[0] for f in self.groups[i]]
        return add_aux({self.name: to_layout(np.stack(xs), self.last).astype(self.dtype, copy=False)},
                       self.name, self.aux)


def sample_count(feeds: Sequence[Feeds]) -> int:
    """How many images ``feeds`` hold (each feed's batch); an :class:`ImageFeeds` is counted by its
    files, without reading them."""
    if isinstance(feeds, ImageFeeds):
        return len(feeds.files)
    return sum(int(next(iter(f.values())).shape[0]) for f in feeds if f)


def load_calibration(source: PathLike, model: onnx.ModelProto, preset: Optional[str] = None,
                     limit: Optional[int] = None, input_shape: Optional[Sequence[int]] = None,
                     progress: bool = True) -> Sequence[Feeds]:
    """Calibration feeds for a PassContext: a lazy :class:`ImageFeeds` for an image folder (every
    image is decoded once up front to fail early on a bad file), a list for array files."""
    src = Path(source)
    if src.suffix.lower() in ARRAY_SUFFIXES:
        feeds: Sequence[Feeds] = list(iter_inputs(source, model, preset, limit, input_shape, progress))
    else:
        name, chw = model_input(model, input_shape)
        _require_rgb(src, name, chw)
        files = list_images(src)[:limit] if limit else list_images(src)
        for f in bar(files, total=len(files), desc="checking images", enabled=progress):
            read_image(f)
        feeds = ImageFeeds(files, name, get_preset(preset, model), chw[1:],
                           ir.input_dtypes(model).get(name, np.dtype(np.float32)),
                           model_batch(model, input_shape), channels_last(model), aux_inputs(model))
    if not len(feeds):
        raise UsageError(f"{source}: no calibration samples")
    return feeds


__all__ = ["Preset", "PRESETS", "Meta", "list_images", "read_image", "letterbox", "preprocess",
           "detect_preset", "preset_choice", "describe_preset", "get_preset", "takes_pixels", "model_input",
           "channels_last", "AUX_INPUTS", "aux_inputs", "image_inputs", "aux_value", "add_aux",
           "full_input_shape", "to_layout", "model_batch", "groups", "iter_images", "iter_inputs",
           "load_calibration", "ImageFeeds", "sample_count"]
