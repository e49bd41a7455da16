"""The one boundary with onnx / protobuf / graphsurgeon.

Load and save (external data, atomic writes, never over the input), graphsurgeon import and
export, opset upgrade, unique names, and small edit helpers shared by passes.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import (Any, Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Set, Tuple,
                    Union)

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from google.protobuf.message import EncodeError, Message
from onnx import numpy_helper

from .pass_base import ModelLoadError, PreconditionError, UsageError

log = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
#: protobuf refuses to serialize a message over 2 GiB; stay a little under.
PROTO_LIMIT = 2 ** 31 - 2 ** 24
DEFAULT_DOMAINS = ("", "ai.onnx")


# ------------------------------------------------------------------------------- load and save
def load(path: PathLike, load_external_data: bool = True) -> onnx.ModelProto:
    """Read a model; a missing, non-ONNX or truncated file raises :class:`ModelLoadError`."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"{p}: no such file")
    if p.is_dir():
        raise ModelLoadError(f"{p}: is a directory, expected an .onnx file")
    try:
        model = onnx.load(str(p), load_external_data=False)
        if load_external_data:
            _require_external_files(model, p)
            onnx.load_external_data_for_model(model, str(p.parent))
    except ModelLoadError:
        raise
    except Exception as exc:  # protobuf raises DecodeError, external data raises others
        raise ModelLoadError(f"{p}: not a readable ONNX model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'parse failed'})") from None
    if not model.graph.node and not model.graph.output:
        raise ModelLoadError(f"{p}: not a readable ONNX model (empty or truncated graph)")
    if not model.opset_import:
        raise ModelLoadError(f"{p}: model declares no opset")
    return model


def _external_locations(model: onnx.ModelProto) -> Iterator[str]:
    """The external-data file name of each tensor stored outside the proto (subgraphs included)."""
    def tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
        yield from graph.initializer
        for n in graph.node:
            for a in n.attribute:
                if a.HasField("t"):
                    yield a.t
                yield from a.tensors
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    yield from tensors(g)

    for t in tensors(model.graph):
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield next((e.value for e in t.external_data if e.key == "location"), "")


def _require_external_files(model: onnx.ModelProto, path: Path) -> None:
    """Each external-data file the model names exists beside it (PyTorch's dynamo exporter writes
    the weights to ``model.onnx.data``; a model copied without it cannot load)."""
    for loc in _external_locations(model):
        if not (path.parent / loc).is_file():
            raise ModelLoadError(f"{path}: its weights are stored in '{loc}' beside it (external data), "
                                 "and that file is missing: copy it next to the model")


def external_files(path: PathLike) -> List[Path]:
    """The external-data files an ``.onnx`` file keeps its weights in (none for another file, or
    one that does not read as a model: loading it reports that)."""
    p = Path(path)
    if p.suffix.lower() != ".onnx" or not p.is_file():
        return []
    st = p.stat()   # optimize claims its outputs twice (the CLI, then the API): one parse
    return [p.parent / loc for loc in _external_names(str(p.resolve()), st.st_mtime_ns, st.st_size)]


@functools.lru_cache(maxsize=8)
def _external_names(path: str, mtime_ns: int, size: int) -> Tuple[str, ...]:
    """The external-data file names of one version of a model file (its time and size name it)."""
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception:   # noqa: BLE001 - not a model: ``load`` says why, later
        return ()
    return tuple(sorted({loc for loc in _external_locations(model) if loc}))


def model_size(model: onnx.ModelProto) -> int:
    """Serialized size in bytes (without writing the file), exact.

    protobuf's upb backend sizes a message by serializing it (1.3 s for a 389 MB model, and the
    pipeline asks dozens of times), so the raw weights are counted by their length: the message
    sized is a copy of the model without them, and each adds its bytes, field tag and length
    prefixes. That copy stays under protobuf's 2 GiB limit; one that does not (weights held in
    float_data) is sized by its parts, a few bytes short."""
    light, raw = _without_raw_weights(model)
    try:
        size = light.ByteSize()
    except EncodeError:
        return _size_by_parts(model)
    if not raw:
        return size
    graph = light.graph.ByteSize()
    grown = graph + sum(_field_len(head + _field_len(n)) - _field_len(head) for head, n in raw)
    return size + _field_len(grown) - _field_len(graph)


def _varint_len(n: int) -> int:
    return max(1, (n.bit_length() + 6) // 7)


def _field_len(n: int) -> int:
    """Bytes of a length-delimited field of ``n`` bytes with a one-byte tag (field numbers < 16)."""
    return 1 + _varint_len(n) + n


def _repeated(fd: Any) -> bool:
    return fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED


def _copy_fields(src: Message, dst: Message, skip: str) -> None:
    """Every set field of ``src`` but ``skip`` onto the empty ``dst`` of the same type."""
    for fd, value in src.ListFields():
        if fd.name == skip:
            continue
        if _repeated(fd):
            getattr(dst, fd.name).extend(value)
        elif fd.message_type is not None:
            getattr(dst, fd.name).CopyFrom(value)
        else:
            setattr(dst, fd.name, value)


def _without_raw_weights(model: onnx.ModelProto) -> Tuple[onnx.ModelProto, List[Tuple[int, int]]]:
    """A copy of ``model`` whose main-graph initializers hold no ``raw_data``, and per such
    initializer its size without it and the length of the raw bytes it held (the model itself when
    none holds any)."""
    g = model.graph
    if not any(t.HasField("raw_data") for t in g.initializer):
        return model, []
    light = onnx.ModelProto()
    _copy_fields(model, light, skip="graph")
    _copy_fields(g, light.graph, skip="initializer")
    raw = []
    for t in g.initializer:
        head = light.graph.initializer.add()
        _copy_fields(t, head, skip="raw_data")
        if t.HasField("raw_data"):
            raw.append((head.ByteSize(), len(t.raw_data)))
    return light, raw


def _size_by_parts(model: onnx.ModelProto) -> int:
    """Each element's size plus its field tag and length prefix; misses only the model's and the
    graph's scalar fields (names, versions: tens of bytes)."""
    g = model.graph
    parts = [g.initializer, g.sparse_initializer, g.node, g.input, g.output, g.value_info, model.functions,
             model.opset_import]
    sizes = [x.ByteSize() for part in parts for x in part]
    return sum(n + 1 + max(1, (n.bit_length() + 6) // 7) for n in sizes)


#: initializers above this many bytes become typed graph inputs in :func:`infer_shapes`'s copy
_LIGHT_TENSOR = 1 << 16


def infer_shapes(model: onnx.ModelProto, **kwargs: Any) -> onnx.ModelProto:
    """``onnx.shape_inference.infer_shapes`` (same keyword arguments), also over 2 GiB, and past
    ops onnx infers nothing for (:data:`SAME_SHAPE_UNINFERRED`).

    onnx serializes the model to infer it, which protobuf refuses above 2 GiB. Such a model is
    inferred without its weights (see :func:`_infer_light`); the inferred value_info and outputs
    are then put on a copy of the original."""
    model = _seed_uninferred(model, kwargs)
    if model_size(model) <= PROTO_LIMIT:
        return _with_contrib_types(model, onnx.shape_inference.infer_shapes(model, **kwargs), kwargs)
    inferred = _with_contrib_types(model, _infer_light(model, **kwargs), kwargs)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.value_info[:]
    out.graph.value_info.extend(inferred.graph.value_info)
    del out.graph.output[:]
    out.graph.output.extend(inferred.graph.output)
    return out


def inferred_values(model: onnx.ModelProto, **kwargs: Any) -> List[onnx.ValueInfoProto]:
    """The value_info and graph outputs shape inference gives (same keyword arguments as
    :func:`infer_shapes`), for callers that read only types and shapes: over 2 GiB this makes no
    copy of the weights."""
    return _values(_seed_uninferred(model, kwargs), kwargs)


def _values(model: onnx.ModelProto, kwargs: Mapping[str, Any]) -> List[onnx.ValueInfoProto]:
    if model_size(model) <= PROTO_LIMIT:
        g = _with_contrib_types(model, onnx.shape_inference.infer_shapes(model, **kwargs), kwargs).graph
    else:
        g = _with_contrib_types(model, _infer_light(model, **kwargs), kwargs).graph
    return list(g.value_info) + list(g.output)


#: ops whose output has its first input's type and shape but for which onnx infers nothing
#: (GroupNormalization-21 is a function built per node, and onnx's inference does not expand
#: it): every tensor after one stayed unknown, and strict inference failed there
SAME_SHAPE_UNINFERRED = frozenset({"GroupNormalization"})


def _seed_uninferred(model: onnx.ModelProto, kwargs: Mapping[str, Any]) -> onnx.ModelProto:
    """``model``, or a copy whose value_info gives each output of a :data:`SAME_SHAPE_UNINFERRED`
    node its input's type and shape, as far as inference (not strict) reaches them."""
    nodes = [n for n in model.graph.node if n.op_type in SAME_SHAPE_UNINFERRED
             and n.domain in ("", "ai.onnx") and n.input and n.output and n.output[0]]
    if not nodes:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    loose = {k: v for k, v in kwargs.items() if k == "data_prop"}
    while nodes:   # each round reaches at least one more of them, or stops
        known = {vi.name: vi for vi in list(out.graph.input) + _values(out, loose)
                 if vi.type.tensor_type.elem_type}
        nodes = [n for n in nodes if n.output[0] not in known]
        seeded = [n for n in nodes if n.input[0] in known]
        for n in seeded:
            vi = onnx.ValueInfoProto()
            vi.CopyFrom(known[n.input[0]])
            vi.name = n.output[0]
            out.graph.value_info.append(vi)
        if not seeded:
            break
        nodes = [n for n in nodes if n.input[0] not in known]
    return out


#: the domain of onnxruntime's own ops (its optimizer's fusions: QuickGelu, FusedConv, ...)
CONTRIB_DOMAIN = "com.microsoft"


def _with_contrib_types(model: onnx.ModelProto, inferred: onnx.ModelProto,
                        kwargs: Mapping[str, Any]) -> onnx.ModelProto:
    """``inferred`` with the types and shapes onnx's inference leaves out after onnxruntime's own
    ops (a model saved by onnxruntime's optimizer holds ``com.microsoft`` QuickGelu and FusedConv:
    onnx's inference stops at them, so every Conv after the first had no shape and no type, its
    MACs counted 0 and its input taken for no float activation), from onnxruntime's symbolic shape
    inference, which reads those ops. Best effort: ``inferred`` as it was when that fails too.
    Not under ``strict_mode``, which asks for onnx's verdict alone."""
    if kwargs.get("strict_mode") or not any(n.domain == CONTRIB_DOMAIN for n in all_nodes(model.graph)):
        return inferred
    g = inferred.graph
    known = {vi.name for vi in list(g.value_info) + list(g.output)
             if vi.type.tensor_type.elem_type and vi.type.tensor_type.HasField("shape")}
    missing = {o for n in model.graph.node for o in n.output if o and o not in known}
    if not missing:
        return inferred
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        extra = SymbolicShapeInference.infer_shapes(inferred, auto_merge=True, guess_output_rank=True)
    except Exception as exc:   # noqa: BLE001 -- it raises what it meets; the types stay unknown
        log.debug("onnxruntime's symbolic shape inference failed too: %s", exc)
        return inferred
    found = {vi.name: vi for vi in list(extra.graph.value_info) + list(extra.graph.output)
             if vi.name in missing and vi.type.tensor_type.elem_type}
    if not found:
        return inferred
    out = onnx.ModelProto()
    out.CopyFrom(inferred)
    outputs = {o.name: i for i, o in enumerate(out.graph.output)}
    for name, vi in found.items():
        if name in outputs:
            out.graph.output[outputs[name]].CopyFrom(vi)
        else:
            out.graph.value_info.append(vi)
    return out


def _infer_light(model: onnx.ModelProto, **kwargs: Any) -> onnx.ModelProto:
    """Shape inference on a copy without the large weights: every initializer over
    ``_LIGHT_TENSOR`` bytes is declared as a graph input of its shape and type instead (small ones,
    which data propagation may read, stay). Returns that inferred light copy."""
    light = _copy_except_initializers(model)
    declared = {i.name for i in model.graph.input}
    for t in model.graph.initializer:
        if t.ByteSize() <= _LIGHT_TENSOR:
            light.graph.initializer.append(t)
        elif t.name not in declared:
            light.graph.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return onnx.shape_inference.infer_shapes(light, **kwargs)


def check_model(model: onnx.ModelProto, infer: bool = False) -> Optional[onnx.ModelProto]:
    """``onnx.checker.check_model`` with ``full_check``, also over 2 GiB; raises what onnx raises.

    Over the limit the checker reads a temporary external-data copy, without its full check (whose
    shape inference cannot read external tensors); strict shape inference runs through
    :func:`infer_shapes` instead. With ``infer``, the model with its strictly inferred value_info is
    returned (also under the limit); otherwise None."""
    strict = dict(check_type=True, strict_mode=True)
    small = model_size(model) <= PROTO_LIMIT
    if small:
        # the full check is this check plus strict inference: with ``infer`` that runs once, below
        onnx.checker.check_model(model, full_check=not infer)
    else:
        with tempfile.TemporaryDirectory(prefix="osy_check_") as td:
            path = Path(td) / "model.onnx"
            save(model, path, external_data=True)
            onnx.checker.check_model(str(path))
    if infer:
        return infer_shapes(model, **strict)
    if not small:
        inferred_values(model, **strict)
    return None


def _copy_except_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of everything but the graph's initializers: cheap when the weights are the model."""
    out = onnx.ModelProto()
    for dst, src, skip in ((out, model, "graph"), (out.graph, model.graph, "initializer")):
        for f, v in src.ListFields():
            if f.name == skip:
                continue
            if isinstance(v, Message):
                getattr(dst, f.name).CopyFrom(v)
            elif hasattr(v, "extend"):  # a repeated field
                getattr(dst, f.name).extend(v)
            else:
                setattr(dst, f.name, v)
    return out


#: tensors over this many bytes go to the data file (onnx's own default); smaller ones, such as
#: Resize scales and Reshape shapes, stay inline where shape inference reads them
_EXTERNAL_MIN = 1024
_EXTERNAL_ALIGN = 4096


def _save_external(model: onnx.ModelProto, proto_path: str, data_path: Path, location: str) -> None:
    """Write the graph to ``proto_path`` and its initializers over :data:`_EXTERNAL_MIN` bytes to
    ``data_path`` (named ``location`` in the proto, page-aligned), without copying the model."""
    light = _copy_except_initializers(model)
    with open(data_path, "wb") as f:
        for t in model.graph.initializer:
            if (t.data_location == onnx.TensorProto.EXTERNAL or t.data_type == onnx.TensorProto.STRING
                    or t.ByteSize() <= _EXTERNAL_MIN):
                light.graph.initializer.append(t)
                continue
            blob = t.raw_data if t.HasField("raw_data") else numpy_helper.to_array(t).tobytes()
            offset = -(-f.tell() // _EXTERNAL_ALIGN) * _EXTERNAL_ALIGN
            f.write(b"\0" * (offset - f.tell()))
            f.write(blob)
            ref = light.graph.initializer.add(name=t.name, data_type=t.data_type, dims=t.dims,
                                              doc_string=t.doc_string,
                                              data_location=onnx.TensorProto.EXTERNAL)
            for key, value in (("location", location), ("offset", offset), ("length", len(blob))):
                ref.external_data.add(key=key, value=str(value))
            del blob
    onnx.save_model(light, proto_path)


def save(model: onnx.ModelProto, path: PathLike, *, protect: Iterable[PathLike] = (),
         external_data: Optional[bool] = None) -> Path:
    """Write atomically: a temp file beside the target, then rename.

    ``protect`` lists paths that must never be overwritten (the input model). External data is
    used when the model would not fit in one protobuf (or when asked).
    """
    if not isinstance(model, onnx.ModelProto):
        raise UsageError(f"save takes an onnx.ModelProto, got {type(model).__name__}")
    out = Path(path)
    if isinstance(protect, (str, os.PathLike)):   # one path, not its letters
        protect = [protect]
    if any(same_file(out, q) for q in protect):
        raise UsageError(f"{out}: refusing to overwrite the input model; choose another -o")
    if external_data is None:
        external_data = model_size(model) > PROTO_LIMIT
    with replacing(out) as tmp:
        if external_data:
            data_name = out.name + ".data"
            tmp_data = out.parent / ("." + data_name + ".tmp")
            # the proto names the final data file; write it, then rename both
            try:
                _save_external(model, tmp, tmp_data, data_name)
            except BaseException:
                tmp_data.unlink(missing_ok=True)
                raise
            os.replace(tmp_data, out.parent / data_name)
        else:
            onnx.save_model(model, tmp)
    return out


def ensure_writable(path: PathLike, what: str = "output") -> None:
    """Raise UsageError, naming ``path`` and the reason, unless a file can be written there: its
    folder exists (or can be made) and takes a new file. Checked before a long run, not after;
    folders made for the check are removed again (the write makes them), so a run that fails
    later leaves none behind."""
    out = Path(path)
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; give a file name for the {what}")
    made = [d for d in (out.parent, *out.parent.parents) if not d.exists()]   # deepest first
    try:
        os.unlink(_temp_beside(out, f" the {what}"))
    finally:
        for d in made:
            try:
                d.rmdir()
            except OSError:
                break


def same_file(a: PathLike, b: PathLike) -> bool:
    """Whether two paths name one file: the same inode when both exist (links too), else the
    same resolved path."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):   # a symlink loop: compare the paths as written
        return os.path.abspath(a) == os.path.abspath(b)


def _read_from_folder(path: Path, folder: Path) -> bool:
    """Whether ``path`` is a file an input ``folder`` is read for: directly inside it, named as an
    image, a YOLO label or a calibration array (an output there replaced one, or is read as one
    by the next run)."""
    from .data import ARRAY_SUFFIXES, IMAGE_SUFFIXES

    return path.suffix.lower() in IMAGE_SUFFIXES + ARRAY_SUFFIXES + (".txt",) and folder.is_dir() \
        and same_file(path.parent, folder)


def claim_outputs(outputs: Mapping[str, Optional[PathLike]],
                  inputs: Optional[Mapping[str, Optional[PathLike]]] = None) -> None:
    """Check, before a run, that each output (``{what: path}``, None skipped) can be written and
    would overwrite neither an input (``{what: path}``: the model, a reference, a labels JSON;
    a model's external-data files too) nor another output of the same run; a UsageError naming
    the path and both roles if not."""
    outs = [(what, Path(p)) for what, p in outputs.items() if p]
    ins = [(what, Path(p)) for what, p in (inputs or {}).items() if p]
    # only an existing file can hold a model's weights (reading the model to know costs a parse)
    if any(p.exists() for _, out in outs for p in (out, out.parent / (out.name + ".data"))):
        ins += [(f"{what}'s external data", f) for what, q in ins for f in external_files(q)]
    for i, (what, out) in enumerate(outs):
        # a model over 2 GB is written with its weights in <name>.data beside it (:func:`save`)
        data = [(f"{what}'s external data", out.parent / (out.name + ".data"))] \
            if out.suffix.lower() == ".onnx" else []
        for mine, path in [(what, out), *data]:
            for other, q in ins:
                if same_file(path, q):
                    raise UsageError(f"{path}: refusing to overwrite the {other} with the {mine}; "
                                     "choose another path")
                if _read_from_folder(path, q):
                    raise UsageError(f"{path}: refusing to write the {mine} among the {other} (a folder "
                                     "read for such files); choose another path")
        for other, q in outs[:i]:
            if same_file(out, q):
                raise UsageError(f"{out}: given for both the {other} and the {what}; choose another path")
    for what, out in outs:
        ensure_writable(out, what)


def _temp_beside(out: Path, what: str = "") -> str:
    """A new empty temp file in ``out``'s folder (made if missing); a UsageError naming ``out``
    when the folder cannot take it."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + out.name + ".", suffix=".tmp", dir=str(out.parent))
    except OSError as exc:
        file = next((d for d in out.parents if d.exists() and not d.is_dir()), None)
        why = f"{file} is a file, not a folder" if file is not None else exc.strerror or exc
        raise UsageError(f"{out}: cannot write{what} there ({why})") from None
    os.close(fd)
    return tmp


@contextmanager
def replacing(out: Path) -> Iterator[str]:
    """A temp file path beside ``out``, renamed onto ``out`` when the block succeeds and removed
    when it fails: what ``out`` held stays whole until the new content is complete. A folder that
    cannot take the file, or a write that fails (a full disk), is a UsageError naming it."""
    tmp = _temp_beside(out)
    try:
        yield tmp
        # mkstemp makes the file private (0600); the result gets the mode a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, out)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):   # a full disk, a file size limit: what ``out`` held stays
            raise UsageError(f"{out}: cannot write it ({exc.strerror or exc})") from None
        raise


def write_json(path: PathLike, payload: Any, indent: Optional[int] = None,
               default: Optional[Callable[[Any], Any]] = None) -> Path:
    """Write JSON atomically: a temp file beside ``path``, then rename (compact without ``indent``).
    A number that is not finite (an unenforced limit, an SQNR of identical outputs) is written as
    null: Python wrote ``Infinity``, which is no JSON, and strict parsers refused every report."""
    out = Path(path)
    with replacing(out) as tmp, open(tmp, "w") as f:
        json.dump(_finite(payload, default), f, indent=indent, default=default, allow_nan=False,
                  separators=None if indent is not None else (",", ":"))
    return out


def _finite(o: Any, default: Optional[Callable[[Any], Any]]) -> Any:
    """``o`` with every non-finite float made None, through dicts, lists and what ``default``
    turns other objects into (numpy scalars and arrays)."""
    if isinstance(o, dict):
        return {k: _finite(v, default) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_finite(v, default) for v in o]
    if isinstance(o, float):
        return o if math.isfinite(o) else None
    if o is None or isinstance(o, (bool, int, str)) or default is None:
        return o
    try:
        plain = default(o)
    except TypeError:   # json.dump says what cannot be written
        return o
    return o if plain is o else _finite(plain, default)


#: fold constants, re-infer shapes, fold again: at most this many rounds (each one stops early
#: once nothing changes). A shape computed from another shape resolves one level per round: in
#: torchvision's FPN each upsampling to the size of the next level (RetinaNet: 6 rounds); in a
#: dynamic-batch ShuffleNet each channel shuffle after the last (ShuffleNetV2 YOLO: 36 rounds).
FOLD_ROUNDS = 64


def holds_subgraph(node: onnx.NodeProto) -> bool:
    """Whether ``node`` holds a subgraph (If, Loop, Scan): it may read outer tensors that none of
    its inputs name, so a graph cut by its listed inputs is not safe at or around it."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def has_subgraphs(graph: onnx.GraphProto) -> bool:
    """Whether a node of ``graph`` holds a subgraph (see :func:`holds_subgraph`)."""
    return any(holds_subgraph(n) for n in graph.node)


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """Every node of ``graph``, then of the subgraphs its nodes hold (If branches, Loop and Scan
    bodies), depth first."""
    for node in graph.node:
        yield node
        yield from subgraph_nodes(node)


def subgraph_nodes(node: onnx.NodeProto) -> Iterator[onnx.NodeProto]:
    """Every node of the subgraphs ``node`` holds, nested ones included (none for most nodes)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield from all_nodes(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            for sub in a.graphs:
                yield from all_nodes(sub)


def node_label(node: onnx.NodeProto, index: Optional[int] = None) -> str:
    """How messages name a node: its name, or ``Op(first output)`` when it has none (``Op(index)``
    for a node without outputs)."""
    if node.name:
        return node.name
    if node.output:
        return f"{node.op_type}({node.output[0]})"
    return f"{node.op_type}({'' if index is None else index})"


def node_graph(model: onnx.ModelProto):
    """networkx DiGraph of node names, an edge from each producer to each consumer."""
    import networkx as nx

    g = nx.DiGraph()
    prod = {o: n.name for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        g.add_node(n.name)
        for i in n.input:
            if i in prod:
                g.add_edge(prod[i], n.name)
    return g


def serialize_for_runtime(model: onnx.ModelProto, tmpdir: PathLike) -> Union[bytes, str]:
    """Bytes for an InferenceSession, or a file path when the model is over the protobuf limit."""
    if model_size(model) <= PROTO_LIMIT:
        return model.SerializeToString()
    path = Path(tmpdir) / "model.onnx"
    save(model, path, external_data=True)
    return str(path)


# ---------------------------------------------------------------------------------- opset
def lowest_ir_version(opsets: Sequence[onnx.OperatorSetIdProto]) -> int:
    """The lowest IR version a model importing ``opsets`` can carry (onnx's newest for an opset it
    does not know). For models built here to run in onnxruntime: ``helper.make_model`` stamps the
    installed onnx's own IR version (14 with onnx 1.23), which older onnxruntime refuses to load
    (1.23, the last with Python 3.10 wheels, reads up to IR 11)."""
    try:
        return int(onnx.helper.find_min_ir_version_for(list(opsets)))
    except ValueError:   # an opset newer than this onnx knows
        return int(onnx.IR_VERSION)


def opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return int(imp.version)
    return 0


def ensure_opset(model: onnx.ModelProto, version: int) -> onnx.ModelProto:
    """Upgrade the default-domain opset to at least ``version`` (onnx.version_converter)."""
    current = opset(model)
    if current >= version:
        return model
    try:
        from onnx import version_converter
        upgraded = version_converter.convert_version(model, version)
    except Exception as exc:
        raise PreconditionError(f"opset upgrade {current} -> {version} failed: "
                                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    log.info("upgraded opset %d -> %d", current, version)
    return upgraded


# ---------------------------------------------------------------------------- graphsurgeon
#: a Constant node's scalar and list attributes, and the type ONNX gives their tensor
CONSTANT_ATTRS = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
                  "value_ints": np.int64}


def to_graph(model: onnx.ModelProto) -> gs.Graph:
    """``model`` in graphsurgeon, each Constant written with ``value_float(s)`` or ``value_int(s)``
    given its ``value`` tensor: graphsurgeon reads such an attribute as a Python number, and its
    constant folding then made a float64 tensor of a float (a Concat of it and a float32 tensor
    failed the checker)."""
    graph = gs.import_onnx(model)
    _keep_declared_dim_names(model, graph)
    for node in graph.nodes:
        key = next((k for k in CONSTANT_ATTRS if k in node.attrs), None) if node.op == "Constant" else None
        if key is not None:
            value = np.asarray(node.attrs.pop(key), dtype=CONSTANT_ATTRS[key])
            node.attrs["value"] = gs.Constant(node.outputs[0].name + "_value", value)
    return graph


def _keep_declared_dim_names(model: onnx.ModelProto, graph: gs.Graph) -> None:
    """Graph outputs keep the dim names they declare where graphsurgeon took another symbol from
    value_info: an onnxslim-simplified dynamic YOLO11n lists output0 there as (batch, 84, <a size
    expression>) beside its declared (batch, 84, anchors), and every pass's output declared the
    expression, so reference.io failed on the exact pipeline. A static dim inferred is kept."""
    declared = {vi.name: [d.dim_param if d.HasField("dim_param") else None
                          for d in vi.type.tensor_type.shape.dim]
                for vi in model.graph.output if vi.type.HasField("tensor_type")}
    for t in graph.outputs:
        names, shape = declared.get(t.name), t.shape
        if not names or shape is None or len(shape) != len(names):
            continue
        t.shape = [n if n and isinstance(d, str) else d for n, d in zip(names, shape)]


def is_topological(graph: onnx.GraphProto) -> bool:
    """Whether every node of ``graph`` comes after the producers of its inputs."""
    known = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for node in graph.node:
        if any(i not in known for i in node.input):
            return False
        known.update(node.output)
    return True


def to_model(graph: gs.Graph, like: onnx.ModelProto, cleanup: bool = True) -> onnx.ModelProto:
    """Export a graph, keeping the original model's metadata, opsets and producer."""
    if cleanup:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    out = gs.export_onnx(graph, do_type_check=False)
    out.ir_version = like.ir_version
    inputs = {i.name for i in out.graph.input}
    if out.ir_version < 4 and any(t.name not in inputs for t in out.graph.initializer):
        out.ir_version = 4   # IR 3 lists every initializer as a graph input; graphsurgeon does not
    del out.opset_import[:]
    out.opset_import.extend(like.opset_import)
    # graphsurgeon may bump the default opset to graph.opset; keep the model's own
    if graph.opset and graph.opset != opset(like):
        for imp in out.opset_import:
            if imp.domain in DEFAULT_DOMAINS:
                imp.version = max(int(imp.version), int(graph.opset))
    del out.metadata_props[:]
    out.metadata_props.extend(like.metadata_props)
    out.producer_name = like.producer_name or "onnxslim-yolo"
    out.producer_version = like.producer_version
    out.doc_string = like.doc_string
    out.model_version = like.model_version
    return out


def consumers(t: gs.Variable) -> List[gs.Node]:
    return list(t.outputs)


def producer(t: gs.Tensor) -> Optional[gs.Node]:
    return t.inputs[0] if len(t.inputs) == 1 else None


def only_reader(t: gs.Tensor, op: str) -> Optional[gs.Node]:
    """The node reading ``t`` when it is the only one and an ``op``, else None."""
    readers = list(t.outputs)
    return readers[0] if len(readers) == 1 and readers[0].op == op else None


def const_value(t: gs.Tensor) -> Optional[np.ndarray]:
    """The value of a constant tensor: an initializer, or the output of a Constant node."""
    if isinstance(t, gs.Constant):
        return np.asarray(t.values)
    p = producer(t) if isinstance(t, gs.Variable) else None
    if p is not None and p.op == "Constant":
        a = p.attrs.get("value")
        if isinstance(a, gs.Constant):
            return np.asarray(a.values)
        for key, dtype in CONSTANT_ATTRS.items():   # a graph not read by to_graph
            if key in p.attrs:
                return np.asarray(p.attrs[key], dtype=dtype)
    return None


def const_ints(node: gs.Node, index: int, attr: Optional[str] = None) -> Optional[List[int]]:
    """The ints of attribute ``attr`` (older opsets) or else of the constant input ``index`` (a
    Reshape's target, Slice bounds, axes); [] when neither is given, None when the input is
    computed."""
    if attr is not None and attr in node.attrs:
        return [int(a) for a in node.attrs[attr]]
    if len(node.inputs) <= index or not node.inputs[index].name:
        return []
    v = const_value(node.inputs[index])
    return None if v is None else [int(a) for a in np.asarray(v).ravel()]


def picked_indices(node: gs.Node, length: int) -> Optional[List[int]]:
    """The positions of a 1-D vector of ``length`` entries (a shape) that ``node`` takes, in
    order: a Gather on axis 0 of constant indices, or a Slice on axis 0 with constant bounds
    (any step). None for any other node, computed bounds or indices out of range."""
    if node.op == "Gather" and int(node.attrs.get("axis", 0)) == 0 and len(node.inputs) > 1:
        idx = const_value(node.inputs[1])
        if idx is None or not all(-length <= int(i) < length for i in np.ravel(idx)):
            return None
        return [int(i) % length for i in np.ravel(idx)]
    if node.op == "Slice":
        starts, ends = const_ints(node, 1, "starts"), const_ints(node, 2, "ends")
        axes, steps = const_ints(node, 3, "axes"), const_ints(node, 4, "steps")
        if not starts or not ends or axes not in ([], [0], [-1]) or steps is None or len(steps) > 1:
            return None
        return list(range(length))[slice(starts[0], ends[0], steps[0] if steps else 1)]
    return None


def reshape_target(node: gs.Node) -> Optional[List[int]]:
    """A Reshape's constant target shape; None when it is computed or, with ``allowzero`` set,
    holds a 0 (a dim of size zero rather than a copy of the input's). ``allowzero`` changes
    nothing else, and PyTorch's dynamo exporter sets it on every Reshape."""
    if node.op != "Reshape" or len(node.inputs) < 2:
        return None
    target = const_ints(node, 1)
    if target is None or (node.attrs.get("allowzero", 0) and 0 in target):
        return None
    return target


def static_dims(t: gs.Tensor, shapes: Optional[Mapping[str, Sequence]] = None) -> Optional[List[int]]:
    """A tensor's shape when every dim is a number: its own, or from ``shapes`` by name (a graph
    whose tensors carry no shapes); None otherwise."""
    s = shapes.get(t.name) if shapes is not None else getattr(t, "shape", None)
    if s is None or not all(isinstance(d, (int, np.integer)) for d in s):
        return None
    return [int(d) for d in s]


@dataclass(frozen=True)
class ConvAttrs:
    """Conv / ConvTranspose attributes with the ONNX defaults filled in (spatial rank ``n``)."""

    kernel: Tuple[int, ...]
    strides: Tuple[int, ...]
    dilations: Tuple[int, ...]
    pads: Tuple[int, ...]          # begin..., end... (ONNX order); zeros when auto_pad is set
    group: int
    auto_pad: str


def text(value: Any) -> str:
    """A string attribute's value as str (onnx and graphsurgeon give bytes)."""
    return value.decode() if isinstance(value, bytes) else str(value)


def conv_attrs(node: gs.Node, weight_shape: Sequence[int]) -> ConvAttrs:
    n = len(weight_shape) - 2
    a = node.attrs
    auto = text(a.get("auto_pad", "NOTSET"))
    return ConvAttrs(
        kernel=tuple(int(v) for v in a.get("kernel_shape", weight_shape[2:])),
        strides=tuple(int(v) for v in a.get("strides", [1] * n)),
        dilations=tuple(int(v) for v in a.get("dilations", [1] * n)),
        pads=tuple(int(v) for v in a.get("pads", [0] * (2 * n))),
        group=int(a.get("group", 1)),
        auto_pad=auto,
    )


def explicit_pads(at: ConvAttrs, spatial: Optional[Sequence[int]]) -> Optional[Tuple[int, ...]]:
    """Pads (begin..., end...) with ``auto_pad`` resolved; None when SAME needs unknown dims."""
    if at.auto_pad in ("NOTSET", ""):
        return at.pads
    n = len(at.kernel)
    if at.auto_pad == "VALID":
        return (0,) * (2 * n)
    if spatial is None or any(not isinstance(d, (int, np.integer)) or d <= 0 for d in spatial):
        return None
    begin: List[int] = []
    end: List[int] = []
    for d, k, s, dl in zip((int(v) for v in spatial), at.kernel, at.strides, at.dilations):
        out = -(-d // s)
        total = max((out - 1) * s + (k - 1) * dl + 1 - d, 0)
        small, large = total // 2, total - total // 2
        # SAME_UPPER puts the odd pixel at the end, SAME_LOWER at the beginning (ONNX spec)
        begin.append(small if at.auto_pad == "SAME_UPPER" else large)
        end.append(large if at.auto_pad == "SAME_UPPER" else small)
    return tuple(begin + end)


def graph_output_names(graph: gs.Graph) -> Set[str]:
    return {t.name for t in graph.outputs}


# -------------------------------------------------------------------------------------- names
class NameAllocator:
    """Hands out names unused in the graph, derived from what a new tensor or node replaces."""

    def __init__(self, taken: Iterable[str] = ()) -> None:
        self._taken: Set[str] = set(taken)

    @classmethod
    def for_graph(cls, graph: Union[gs.Graph, onnx.GraphProto]) -> "NameAllocator":
        taken: Set[str] = set()
        if isinstance(graph, gs.Graph):
            taken.update(graph.tensors().keys())
            taken.update(n.name for n in graph.nodes if n.name)
        else:
            taken.update(i.name for i in graph.initializer)
            taken.update(i.name for i in graph.input)
            taken.update(o.name for o in graph.output)
            for n in graph.node:
                taken.update(n.input)
                taken.update(n.output)
                if n.name:
                    taken.add(n.name)
        return cls(taken)

    def __call__(self, base: str) -> str:
        base = base or "t"
        name, i = base, 0
        while name in self._taken:
            i += 1
            name = f"{base}_{i}"
        self._taken.add(name)
        return name


def name_unnamed_nodes(graph: gs.Graph) -> int:
    """Give every unnamed node a unique name (reports and errors must name nodes)."""
    alloc = NameAllocator.for_graph(graph)
    n = 0
    for node in graph.nodes:
        if not node.name:
            node.name = alloc(f"{node.op}_{node.outputs[0].name if node.outputs else n}")
            n += 1
    return n


# -------------------------------------------------------------------------------------- shapes
def input_shapes(model: onnx.ModelProto) -> Dict[str, Tuple[Union[int, str, None], ...]]:
    """Graph inputs that are not initializers, with their declared dims (str for symbolic)."""
    inits = {i.name for i in model.graph.initializer}
    out: Dict[str, Tuple[Union[int, str, None], ...]] = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        dims: List[Union[int, str, None]] = []
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        out[vi.name] = tuple(dims)
    return out


def static_input_shapes(model: onnx.ModelProto,
                        overrides: Optional[Dict[str, Sequence[int]]] = None) -> Dict[str, Tuple[int, ...]]:
    """Concrete input shapes. A symbolic batch becomes 1; other symbolic dims need ``overrides``,
    which may set only the dims the model leaves symbolic (UsageError otherwise)."""
    overrides = dict(overrides or {})
    res: Dict[str, Tuple[int, ...]] = {}
    declared = input_shapes(model)
    for name, dims in declared.items():
        given = overrides.get(name)
        if given is None and len(overrides) == 1 and len(declared) == 1:
            given = next(iter(overrides.values()))
        if given is not None:
            res[name] = overridden(name, dims, tuple(int(d) for d in given))
            continue
        concrete: List[int] = []
        for i, d in enumerate(dims):
            if isinstance(d, int) and d > 0:
                concrete.append(d)
            elif i == 0:
                concrete.append(1)
            else:
                raise PreconditionError(
                    f"input '{name}' has no static shape {list(dims)}: pass --input-shape, e.g. 1,3,640,640")
        res[name] = tuple(concrete)
    return res


def overridden(name: str, dims: Sequence, given: Tuple[int, ...]) -> Tuple[int, ...]:
    """``given`` for input ``name`` when it agrees with every dim the model fixes."""
    if len(given) != len(dims):
        raise UsageError(f"--input-shape {list(given)}: input '{name}' has rank {len(dims)} {list(dims)}")
    for i, (d, g) in enumerate(zip(dims, given)):
        if isinstance(d, int) and d > 0 and d != g:
            raise UsageError(f"--input-shape {list(given)}: input '{name}' is {list(dims)}, and axis {i} is "
                             f"fixed at {d}; only its symbolic dims can be set")
    return given


def input_dtypes(model: onnx.ModelProto) -> Dict[str, np.dtype]:
    inits = {i.name for i in model.graph.initializer}
    return {vi.name: onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            for vi in model.graph.input if vi.name not in inits}


#: ops that mark a model as already quantized (QDQ or QOperator format)
QUANT_OPS: frozenset = frozenset({"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
                                  "ConvInteger", "MatMulInteger", "DynamicQuantizeLinear", "QLinearAdd",
                                  "QLinearMul"})


def quantized_ops(model: onnx.ModelProto) -> List[str]:
    """The quantization op types the model's graph holds, sorted (empty for a float model)."""
    return sorted({n.op_type for n in model.graph.node if n.op_type in QUANT_OPS})


def require_float32_weights(model: onnx.ModelProto) -> None:
    """Raise PreconditionError naming the first Conv/ConvTranspose/Gemm/MatMul whose constant
    weight is not float32 (a float16 export): the passes that calibrate or refit weights work in
    float32 only (the pass manager puts the pass's name in front)."""
    consts = {t.name: t.data_type for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t.data_type
    for n in model.graph.node:
        if n.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and len(n.input) > 1:
            dt = consts.get(n.input[1])
            if dt is not None and dt != onnx.TensorProto.FLOAT:
                name = onnx.TensorProto.DataType.Name(dt).lower()
                raise PreconditionError(
                    f"{n.op_type} '{n.name or n.output[0]}' has {name} weights: this pass works on float32 "
                    "models; run the 'upcast-float16' pass first (optimize does so for --int8 and --prune "
                    "on float16 models) or export the model in float32")


def fix_input_shapes(model: onnx.ModelProto, shapes: Dict[str, Sequence[int]]) -> onnx.ModelProto:
    """Return a copy whose graph inputs declare the given static shapes. The intermediate shapes
    (value_info) are dropped: they were derived from the old input shape, and shape inference
    keeps a stale symbolic dim there (an onnxslim-simplified dynamic export declares ``batch``
    and size expressions on every tensor, and they reached the outputs)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if shapes:
        del m.graph.value_info[:]
    for vi in m.graph.input:
        if vi.name in shapes:
            dims = vi.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[vi.name]:
                dims.add().dim_value = int(d)
    return m


WEIGHT_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization",
                        "InstanceNormalization", "LayerNormalization", "GroupNormalization", "PRelu",
                        "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"})


def param_tensors(model: onnx.ModelProto) -> Dict[str, Tuple[int, int]]:
    """Learned parameters: name -> (elements, onnx data type) of each constant tensor read by a
    weight-bearing op (Conv, Gemm, MatMul, normalizations), directly or through a
    DequantizeLinear. Grids, anchors and shape constants of a decode tail are not parameters."""
    consts: Dict[str, Tuple[int, int]] = {t.name: (int(np.prod(t.dims)) if len(t.dims) else 1, t.data_type)
                                          for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = (int(np.prod(a.t.dims)) if len(a.t.dims) else 1, a.t.data_type)
    dq_source = {n.output[0]: n.input[0] for n in model.graph.node
                 if n.op_type == "DequantizeLinear" and n.input and n.input[0] in consts}
    counted: Dict[str, Tuple[int, int]] = {}
    for n in model.graph.node:
        if n.op_type not in WEIGHT_OPS:
            continue
        for name in n.input:
            src = dq_source.get(name, name)
            if src in consts:
                counted[src] = consts[src]
    return counted


def param_count(model: onnx.ModelProto) -> int:
    """How many learned parameters (:func:`param_tensors`) the model has."""
    return sum(n for n, _ in param_tensors(model).values())


def np_dtype(onnx_type: int) -> np.dtype:
    """numpy's dtype for an ONNX type number; TypeError for one numpy has no exact match for: onnx
    1.16 gives bfloat16 as float32 (canonicalize dropped a Cast to bfloat16, a rounding, as a no-op)."""
    dt = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))
    if onnx.helper.np_dtype_to_tensor_dtype(dt) != onnx_type:
        raise TypeError(f"ONNX type {onnx_type} has no numpy dtype")
    return dt


def param_dtypes(model: onnx.ModelProto) -> Dict[str, int]:
    """Learned parameters per element type ('float32', 'float16', 'int8', ...), most first."""
    out: Dict[str, int] = {}
    for n, dt in param_tensors(model).values():
        try:
            key = np_dtype(dt).name
        except (KeyError, TypeError, ValueError):   # no numpy type (bfloat16 without ml_dtypes, onnx 1.16)
            key = onnx.TensorProto.DataType.Name(dt).lower()
        out[key] = out.get(key, 0) + n
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def tensor_array(t: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(t)
