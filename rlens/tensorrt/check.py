"""``check_artifact``: every graph of an artifact against TensorRT's ONNX parser rules, without a GPU.

The engines of the TensorRT track can only be built where a GPU is, but most reasons a build fails
are visible in the graph: an op the parser has no importer for (ORT contrib ops above all), a data
type an op is not imported with, an ``axes`` or ``K`` the parser needs as a constant, an opset newer
than the parser documents, or a graph output whose size only the data decides. This module finds
those from the ``.onnx`` files alone (weights stay in their external files), so CI can hold the
graphs to TensorRT's rules on machines without one.

What it cannot see is reported as a note, not a failure: sizes set at run time by the values of
inputs (TensorRT must take those inputs as shape tensors, with value ranges in the profile), or by
data inside the graph (TensorRT computes those on the device). Only an engine build confirms them.

The rules come from ``rlens.tensorrt.support`` (onnx-tensorrt's operators.md and changelog).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from rlens.errors import RlensError
from rlens.tensorrt import support
from rlens.tensorrt.support import Target

if TYPE_CHECKING:
    import onnx

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class Problem:
    """One reason TensorRT's parser or builder would refuse a graph, tied to the node that causes it."""

    graph: str
    node: str
    op: str
    message: str

    def line(self) -> str:
        where = f"{self.node} ({self.op}): " if self.node else ""
        return f"{self.graph}: {where}{self.message}"


@dataclass(frozen=True)
class OpUse:
    """One op type of a graph: how often it appears and whether TensorRT takes every use of it."""

    op: str
    domain: str
    count: int
    status: str

    @property
    def name(self) -> str:
        return self.op if self.domain in DEFAULT_DOMAINS else f"{self.domain}::{self.op}"


@dataclass
class GraphReport:
    name: str
    file: str
    opset: int
    ops: list[OpUse] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "opset": self.opset,
            "ok": self.ok,
            "ops": [{"op": u.name, "count": u.count, "status": u.status} for u in self.ops],
            "problems": [p.line() for p in self.problems],
            "notes": self.notes,
        }


@dataclass
class CheckReport:
    target: Target
    graphs: list[GraphReport]

    @property
    def ok(self) -> bool:
        return all(g.ok for g in self.graphs)

    @property
    def problems(self) -> list[Problem]:
        return [p for g in self.graphs for p in g.problems]

    def to_dict(self) -> dict[str, Any]:
        return {
            "tensorrt_version": self.target.name,
            "max_opset": self.target.max_opset,
            "ok": self.ok,
            "graphs": {g.name: g.to_dict() for g in self.graphs},
            "problems": [p.line() for p in self.problems],
        }


# -- entry points ---------------------------------------------------------------------------------


def check_artifact(artifact_dir: str | Path, target: Target) -> CheckReport:
    """Check every graph ``rlens.json`` lists; a missing directory or manifest is an RlensError."""
    from rlens.manifest import read_manifest

    directory = Path(artifact_dir)
    manifest = read_manifest(directory)
    onnx = _import_onnx()
    reports = []
    for name, graph in manifest.graphs.items():
        path = directory / graph.file
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # a truncated or foreign file: the user's artifact, not our bug
            raise RlensError(f"'{path}' is not a readable ONNX graph ({e}); re-export the model") from e
        reports.append(check_model(model, name, target, file=graph.file))
    return CheckReport(target, reports)


def check_model(model: onnx.ModelProto, name: str, target: Target, file: str = "") -> GraphReport:
    """Check one graph (weights may stay external: only initializer shapes and small values are read)."""
    onnx = _import_onnx()
    with contextlib.suppress(Exception):  # inference helps the type checks; it is no precondition
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    opset = next((o.version for o in model.opset_import if o.domain in DEFAULT_DOMAINS), 1)
    facts = GraphFacts.of(model.graph, opset)
    report = GraphReport(name, file or f"{name}.onnx", opset)

    def problem(node: str, op: str, message: str) -> None:
        report.problems.append(Problem(name, node, op, message))

    if opset > target.max_opset or opset < support.MIN_OPSET:
        problem(
            "",
            "opset",
            f"opset {opset} is outside what TensorRT {target.name}'s ONNX parser documents "
            f"(opset {support.MIN_OPSET} to {target.max_opset})",
        )
    for value in [*model.graph.input, *model.graph.output]:
        kind = support.ONNX_TYPE_NAMES.get(value.type.tensor_type.elem_type, "UNDEFINED")
        if kind not in support.IO_TYPES:
            problem(value.name, "graph input/output", f"type {kind} is not a TensorRT I/O type")

    per_op: dict[tuple[str, str], list[str]] = {}
    counts: Counter[tuple[str, str]] = Counter()
    for node in _all_nodes(model.graph):
        key = (node.domain, node.op_type)
        counts[key] += 1
        issues = per_op.setdefault(key, [])
        for issue in node_issues(node, facts, target):
            if issue.fatal:
                problem(_node_name(node), node.op_type, issue.message)
                issues.append(issue.message)
            elif issue.message not in report.notes:
                report.notes.append(issue.message)
    report.ops = [
        OpUse(op, domain, counts[(domain, op)], _status(per_op[(domain, op)]))
        for domain, op in sorted(counts, key=lambda k: (k[0] not in DEFAULT_DOMAINS, k[0], k[1]))
    ]
    unsized, notes = sizes(model.graph, facts)
    for output, message in unsized:
        problem(output, "output", message)
    report.notes += notes
    if target.beyond_table:
        report.notes.append(
            f"TensorRT {target.name} is newer than the newest support table here "
            f"({support.NEWEST[0]}.{support.NEWEST[1]}); checked against that table"
        )
    return report


def _status(messages: list[str]) -> str:
    if not messages:
        return "ok"
    first = messages[0].split(":")[0].split(";")[0]
    return f"FAIL ({len(messages)}): {first}" if len(messages) > 1 else f"FAIL: {first}"


def _import_onnx() -> Any:
    try:
        import onnx
    except ImportError as e:
        raise RlensError(
            "rlens check needs the onnx package to read graphs: pip install 'rlens[export]'"
        ) from e
    return onnx


def _node_name(node: onnx.NodeProto) -> str:
    return node.name or f"<{node.op_type} -> {', '.join(node.output)}>"


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    """The graph's nodes and those of its control-flow subgraphs (If, Loop, Scan bodies)."""
    for node in graph.node:
        yield node
        for attribute in node.attribute:
            if attribute.HasField("g"):
                yield from _all_nodes(attribute.g)
            for sub in attribute.graphs:
                yield from _all_nodes(sub)


# -- what is known about each value ---------------------------------------------------------------


@dataclass
class GraphFacts:
    """Element types, inferred shapes and compile-time values of a graph's tensors."""

    opset: int
    types: dict[str, int]
    shapes: dict[str, list[int | str | None]]
    initializers: set[str]
    constants: set[str]
    """Initializers and Constant-node outputs: what the parser imports as weights."""
    values: dict[str, np.ndarray]
    """Values known before running: small initializers, Constant nodes, and what folds from them."""
    inputs: dict[str, tuple[int, int]]
    """Graph input -> (element type, rank)."""

    @classmethod
    def of(cls, graph: onnx.GraphProto, opset: int) -> GraphFacts:
        onnx = _import_onnx()
        types: dict[str, int] = {}
        shapes: dict[str, list[int | str | None]] = {}
        for value in [*graph.input, *graph.output, *graph.value_info]:
            tensor = value.type.tensor_type
            types[value.name] = tensor.elem_type
            if tensor.HasField("shape"):
                shapes[value.name] = [
                    d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                    for d in tensor.shape.dim
                ]
        values: dict[str, np.ndarray] = {}
        for init in graph.initializer:
            types[init.name] = init.data_type
            shapes[init.name] = list(init.dims)
            if init.data_location != onnx.TensorProto.EXTERNAL:
                values[init.name] = onnx.numpy_helper.to_array(init)
        facts = cls(
            opset,
            types,
            shapes,
            {i.name for i in graph.initializer},
            {i.name for i in graph.initializer},
            values,
            {
                v.name: (v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim))
                for v in graph.input
                if v.name not in {i.name for i in graph.initializer}
            },
        )
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in DEFAULT_DOMAINS:
                facts.constants.update(node.output)
            folded = _fold(node, facts)
            if folded is not None:
                facts.values[node.output[0]] = folded
        return facts

    def static_shape(self, name: str) -> list[int] | None:
        shape = self.shapes.get(name)
        if shape is None or any(not isinstance(d, int) or isinstance(d, bool) for d in shape):
            return None
        return [int(d) for d in shape]

    def value(self, node: onnx.NodeProto, index: int) -> np.ndarray | None:
        name = node.input[index] if index < len(node.input) else ""
        return self.values.get(name) if name else None


def _fold(node: onnx.NodeProto, facts: GraphFacts) -> np.ndarray | None:
    """The value of ``node``'s first output when it can be computed from known values (shape arithmetic)."""
    if node.domain not in DEFAULT_DOMAINS:
        return None
    onnx = _import_onnx()
    op = node.op_type
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if op == "Constant":
        if "value" in attrs:
            return onnx.numpy_helper.to_array(attrs["value"])
        for key in ("value_int", "value_float"):
            if key in attrs:
                return np.asarray(attrs[key])
        for key in ("value_ints", "value_floats"):
            if key in attrs:
                return np.asarray(attrs[key])
        return None
    if op == "Shape":
        shape = facts.static_shape(node.input[0])
        if shape is None:
            return None
        start, end = attrs.get("start", 0), attrs.get("end", len(shape))
        return np.asarray(shape[start:end], dtype=np.int64)
    inputs = [facts.values.get(name) if name else None for name in node.input]
    if not inputs or any(v is None for v in inputs):
        return None
    x: list[np.ndarray] = [v for v in inputs if v is not None]
    try:
        return _FOLDERS[op](x, attrs) if op in _FOLDERS else None
    except (ValueError, IndexError, TypeError):
        return None


def _squeeze(x: list[np.ndarray], attrs: dict[str, Any]) -> np.ndarray:
    axes = x[1].tolist() if len(x) > 1 else attrs.get("axes")
    return np.squeeze(x[0], axis=tuple(axes)) if axes is not None else np.squeeze(x[0])


def _unsqueeze(x: list[np.ndarray], attrs: dict[str, Any]) -> np.ndarray:
    axes = x[1].tolist() if len(x) > 1 else attrs["axes"]
    return np.expand_dims(x[0], axis=tuple(int(a) for a in np.atleast_1d(axes)))


_FOLDERS: dict[str, Callable[[list[np.ndarray], dict[str, Any]], np.ndarray]] = {
    "Identity": lambda x, a: x[0],
    "Cast": lambda x, a: x[0].astype(_import_onnx().helper.tensor_dtype_to_np_dtype(a["to"])),
    "Gather": lambda x, a: np.take(x[0], x[1], axis=a.get("axis", 0)),
    "Concat": lambda x, a: np.concatenate(x, axis=a["axis"]),
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Reshape": lambda x, a: x[0].reshape([int(d) for d in x[1]]),
    "Add": lambda x, a: x[0] + x[1],
    "Sub": lambda x, a: x[0] - x[1],
    "Mul": lambda x, a: x[0] * x[1],
    "Max": lambda x, a: np.maximum.reduce(x),
    "Min": lambda x, a: np.minimum.reduce(x),
}


# -- per-node rules -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Issue:
    message: str
    fatal: bool = True


def node_issues(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    """Why TensorRT ``target``'s parser would not import ``node``: domain, op, types, restrictions."""
    op = node.op_type
    if node.domain not in DEFAULT_DOMAINS:
        return [
            Issue(
                f"op of domain '{node.domain}': TensorRT's ONNX parser imports only the default ONNX "
                "domain (an ONNX Runtime contrib op would need a TensorRT plugin); use standard ops"
            )
        ]
    if op in support.UNSUPPORTED:
        return [Issue(f"{op} is not supported by TensorRT's ONNX parser (operators.md marks it N)")]
    if op not in support.OPERATORS:
        return [Issue(f"{op} is not in TensorRT {target.name}'s ONNX operator support list")]
    since = support.OPERATORS[op].since
    if since > target.minor:
        return [Issue(f"{op} is imported from TensorRT 10.{since} on, not by {target.name}")]
    issues = _type_issues(node, facts)
    rule = _RULES.get(op) or (_reduce_rule if op.startswith("Reduce") else None)
    if rule is not None:
        issues += rule(node, facts, target)
    return issues


def _type_issues(node: onnx.NodeProto, facts: GraphFacts) -> list[Issue]:
    allowed = support.supported_types(node.op_type)
    checked = [node.input[i] for i in _data_inputs(node, facts.opset)]
    if node.op_type in ("Cast", "CastLike"):
        checked.append(node.output[0])
    issues = []
    for name in checked:
        kind = support.ONNX_TYPE_NAMES.get(facts.types.get(name, 0))
        if kind is not None and kind not in allowed:
            issues.append(
                Issue(
                    f"{kind} '{name}': TensorRT imports {node.op_type} with {', '.join(sorted(allowed))} only"
                )
            )
    return issues


def _data_inputs(node: onnx.NodeProto, opset: int) -> list[int]:
    """Positions of the inputs that carry the op's data type (its main type parameter, e.g. ``T``).

    Index, shape and axes inputs (``Tind``, ``tensor(int64)``) and Where's condition are left out:
    the types column of operators.md is about the data an op computes on.
    """
    onnx = _import_onnx()
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return [0] if node.input and node.input[0] else []
    allowed = {c.type_param_str: c.allowed_type_strs for c in schema.type_constraints}
    formals = list(schema.inputs)
    if not formals:
        return []
    param = next((f.type_str for f in formals if len(allowed.get(f.type_str, ())) > 1), formals[0].type_str)
    variadic = formals[-1].option == onnx.defs.OpSchema.FormalParameterOption.Variadic
    positions = []
    for i, name in enumerate(node.input):
        if not name or (i >= len(formals) and not variadic):
            continue
        if formals[min(i, len(formals) - 1)].type_str == param:
            positions.append(i)
    return positions


def _needs_constant(
    node: onnx.NodeProto, facts: GraphFacts, index: int, what: str, strict: bool
) -> list[Issue]:
    """An input the parser needs at build time: an initializer (``strict``) or anything that folds."""
    if index >= len(node.input) or not node.input[index]:
        return []
    name = node.input[index]
    if name in facts.constants or (not strict and name in facts.values):
        return []
    kind = "an initializer" if strict else "a constant at build time"
    return [Issue(f"{what} '{name}' is computed in the graph; TensorRT needs it as {kind}")]


def _topk_rule(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    issues = []
    if _attr(node, "sorted", 1) != 1:
        issues.append(Issue("sorted=0: TensorRT imports TopK with sorted=1 only"))
    k = facts.value(node, 1)
    if k is None:
        issues.append(
            Issue(
                f"TopK '{_node_name(node)}' takes K at run time: TensorRT needs K < {support.TOPK_MAX_K}",
                False,
            )
        )
    elif int(np.asarray(k).reshape(-1)[0]) >= support.TOPK_MAX_K:
        issues.append(
            Issue(f"K = {int(np.asarray(k).reshape(-1)[0])}: TensorRT's TopK needs K < {support.TOPK_MAX_K}")
        )
    return issues


def _slice_rule(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    if target.minor >= support.SLICE_TENSOR_AXES_SINCE:
        return []
    return _needs_constant(node, facts, 3, "axes", strict=True)


def _pad_rule(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    if target.minor >= support.PAD_TENSOR_AXES_SINCE:
        return []
    return _needs_constant(node, facts, 3, "axes", strict=True)


def _squeeze_rule(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    if len(node.input) > 1 and node.input[1]:
        return _needs_constant(node, facts, 1, "axes", strict=False)
    if node.op_type == "Squeeze" and facts.static_shape(node.input[0]) is None:
        return [
            Issue(
                f"no axes, and the input '{node.input[0]}' has dynamic dimensions: TensorRT cannot tell "
                "which axes to squeeze; give the axes"
            )
        ]
    return []


def _reduce_rule(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    return _needs_constant(node, facts, 1, "axes", strict=True)


def _cumsum_rule(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    return _needs_constant(node, facts, 1, "axis", strict=False)


def _onehot_rule(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    return _needs_constant(node, facts, 1, "depth", strict=False)


def _dropout_rule(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    issues = _needs_constant(node, facts, 2, "is_training", strict=True)
    training = facts.value(node, 2)
    if training is not None and bool(np.asarray(training).reshape(-1)[0]):
        issues.append(Issue("is_training is True: TensorRT imports inference Dropout only"))
    return issues


def _conv_rule(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    if node.input[1] in facts.constants and len(node.input) > 2:
        return _needs_constant(node, facts, 2, "bias", strict=True)
    return []


def _first_output_only(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    extra = [o for o in node.output[1:] if o]
    if extra:
        return [
            Issue(
                f"uses output(s) {', '.join(extra)}: TensorRT imports only the first output of {node.op_type}"
            )
        ]
    return []


def _scatternd_rule(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    reduction = _attr(node, "reduction", b"none")
    if reduction not in (b"none", "none"):
        return [Issue(f"reduction={reduction!r}: TensorRT imports ScatterND with reduction none only")]
    return []


def _eyelike_rule(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    if facts.static_shape(node.input[0]) is None:
        return [Issue("the input has dynamic dimensions: TensorRT needs them static for EyeLike")]
    return []


def _constant_rule(node: onnx.NodeProto, facts: GraphFacts, target: Target) -> list[Issue]:
    unsupported = {a.name for a in node.attribute} & {"sparse_value", "value_string", "value_strings"}
    return [Issue(f"Constant with {name}: not imported by TensorRT") for name in sorted(unsupported)]


_Rule = Callable[["onnx.NodeProto", GraphFacts, Target], list[Issue]]

_RULES: dict[str, _Rule] = {
    "TopK": _topk_rule,
    "Slice": _slice_rule,
    "Pad": _pad_rule,
    "Squeeze": _squeeze_rule,
    "Unsqueeze": _squeeze_rule,
    "CumSum": _cumsum_rule,
    "OneHot": _onehot_rule,
    "Dropout": _dropout_rule,
    "Conv": _conv_rule,
    "LayerNormalization": _first_output_only,
    "MaxPool": _first_output_only,
    "ScatterND": _scatternd_rule,
    "EyeLike": _eyelike_rule,
    "Constant": _constant_rule,
}


def _attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
    onnx = _import_onnx()
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


# -- sizes decided by values ----------------------------------------------------------------------

SIZE_FROM_DATA = frozenset({"NonZero", "Unique", "Compress", "NonMaxSuppression", "StringSplit"})
"""Ops whose output size is the count of something in their input's values."""

SIZE_INPUTS: dict[str, tuple[int, ...]] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Range": (0, 1, 2),
    "TopK": (1,),
    "ConstantOfShape": (0,),
    "Pad": (1, 3),
    "Resize": (2, 3),
    "Upsample": (1,),
    "Split": (1,),
    "OneHot": (1,),
    "Squeeze": (1,),
    "Unsqueeze": (1,),
    "CenterCropPad": (1,),
}
"""Inputs whose values (not shapes) decide an op's output size; Reduce* add their ``axes`` (1)."""

SHAPE_FROM: dict[str, tuple[int, ...]] = {
    "Shape": (),
    "Size": (),
    "ConstantOfShape": (),
    "Range": (),
    "ScatterND": (0,),
    "ScatterElements": (0,),
    "Scatter": (0,),
    "TensorScatter": (0,),
}
"""Ops whose output shape follows only some inputs' shapes (default: all of them)."""


@dataclass(frozen=True)
class _Origin:
    """Where a tensor's size stops following the graph inputs' shapes."""

    node: str
    op: str
    sources: frozenset[str]
    """Graph inputs whose values decide the size."""
    from_inputs: bool
    """True when those are only inputs TensorRT can take as shape tensors (int32/int64, rank <= 1)."""


def sizes(graph: onnx.GraphProto, facts: GraphFacts) -> tuple[list[tuple[str, str]], list[str]]:
    """Graph outputs whose size the data decides, as (output, message), and notes on run-time sizes.

    Each tensor carries the set of graph inputs its *values* depend on. A node whose output size
    depends on such values (a Slice bound, a Range limit, NonZero's count) starts an ``_Origin``;
    shapes carry it on to every tensor shaped by it. An output with an origin in the data cannot be
    sized when the engine is built; one whose origin is only in small integer inputs can, once
    those are shape tensors with value ranges in the optimization profile.
    """
    values_from: dict[str, frozenset[str]] = {name: frozenset({name}) for name in facts.inputs}
    origin: dict[str, _Origin] = {}
    started: list[_Origin] = []

    def shape_tensor_input(name: str) -> bool:
        elem, rank = facts.inputs[name]
        return support.ONNX_TYPE_NAMES.get(elem) in ("INT32", "INT64") and rank <= 1

    def sources_of(names: Iterable[str]) -> frozenset[str]:
        return frozenset().union(*(values_from.get(n, frozenset()) for n in names if n))

    for node in graph.node:
        names = list(node.input)
        inherited = next(
            (
                origin[names[i]]
                for i in SHAPE_FROM.get(node.op_type, range(len(names)))
                if i < len(names) and names[i] in origin
            ),
            None,
        )
        size_inputs = SIZE_INPUTS.get(node.op_type, (1,) if node.op_type.startswith("Reduce") else ())
        deciding = sources_of(names[i] for i in size_inputs if i < len(names))
        counts_data = node.op_type in SIZE_FROM_DATA and (sources_of(names) or inherited is not None)
        found = inherited
        if deciding or counts_data:
            sources = deciding | (sources_of(names) if counts_data else frozenset())
            new = _Origin(
                _node_name(node),
                node.op_type,
                sources,
                not counts_data and all(shape_tensor_input(s) for s in sources),
            )
            started.append(new)
            if found is None or (found.from_inputs and not new.from_inputs):
                found = new
        out_sources = sources_of(names)
        if node.op_type in ("Shape", "Size"):  # values read off a shape the data decided
            out_sources, found = (found.sources if found is not None else frozenset()), None
        for output in node.output:
            if output:
                values_from[output] = out_sources
                if found is not None:
                    origin[output] = found

    unsized: list[tuple[str, str]] = []
    notes: list[str] = []
    for output in graph.output:
        o = origin.get(output.name)
        if o is not None and not o.from_inputs:
            message = (
                f"data-dependent size, decided by {o.op} '{o.node}': TensorRT cannot size this output "
                "when it builds the engine; give it a fixed maximum plus a count (as trim.onnx does)"
            )
            unsized.append((output.name, message))
    by_inputs = [o for o in started if o.from_inputs]
    if by_inputs:
        inputs = ", ".join(sorted({s for o in by_inputs for s in o.sources}))
        shaped = [o.name for o in graph.output if o.name in origin and origin[o.name].from_inputs]
        outputs = f"; outputs shaped by them: {_few(shaped)}" if shaped else "; no output is shaped by them"
        notes.append(
            f"sizes set by the values of input(s) {inputs} at {len(by_inputs)} node(s) (first: "
            f"{by_inputs[0].op} '{by_inputs[0].node}'){outputs}. TensorRT takes such inputs as shape "
            "tensors (values on the host, min/opt/max values in the optimization profile); an engine "
            "build confirms it"
        )
    in_data = [o for o in started if not o.from_inputs]
    if in_data:
        notes.append(
            f"data-dependent sizes inside the graph at {len(in_data)} node(s) (first: {in_data[0].op} "
            f"'{in_data[0].node}'): TensorRT computes them on the device at run time"
        )
    return unsized, notes


def _few(names: list[str], most: int = 3) -> str:
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")
