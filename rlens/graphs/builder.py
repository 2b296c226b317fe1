"""Recording ONNX graphs through values, with readable node names.

Every graph rlens writes is built the same way: a :class:`GraphBuilder` records nodes on an
``onnx_ir`` tape while small functions (``rms_norm``, ``attention``, ...) pass values to each other
the way the math passes tensors. Node names are hierarchical paths (``/model/layers.3/attn/MatMul``)
so that a profile or a Netron view points straight at the block that produced a node.

Weights never pass through here as copies: a :class:`Weights` source hands out tensor objects
(lazily transposed where a ``MatMul`` needs ``[in, out]``), and they are written to external data
one at a time when the model is saved. That is what lets the exporter stream a checkpoint.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

OPSET = 21
"""ONNX opset of every graph: recent enough for every op used here, and within what TensorRT 10 parses."""

IR_VERSION = 10

FLOAT = ir.DataType.FLOAT
INT64 = ir.DataType.INT64
BOOL = ir.DataType.BOOL

Dim = int | str


class Weights:
    """Named tensors a graph reads its initializers from.

    ``get(name, transpose=True)`` returns a 2-D weight as ``[in, out]`` (PyTorch ``Linear`` stores
    ``[out, in]``); the transpose is deferred until the tensor is written, so no second copy of the
    weights is ever held. Subclasses provide ``_load`` and ``names``.
    """

    def names(self) -> set[str]:
        raise NotImplementedError

    def _load(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._load(name).shape)

    def __contains__(self, name: str) -> bool:
        return name in self.names()

    def get(self, name: str, *, transpose: bool = False) -> ir.TensorProtocol:
        if name not in self:
            raise KeyError(f"weight {name!r} not found")
        shape = self._shape(name)
        if transpose:
            assert len(shape) == 2, f"only 2-D weights transpose, {name} is {shape}"
            shape = (shape[1], shape[0])

        def load() -> ir.TensorProtocol:
            array = self._load(name)
            return ir.Tensor(np.ascontiguousarray(array.T if transpose else array))

        return ir.LazyTensor(load, dtype=FLOAT, shape=ir.Shape(shape), name=name)


class ArrayWeights(Weights):
    """Weights held as numpy arrays (tests, small tables computed at export time)."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._arrays = {k: np.asarray(v, dtype=np.float32) for k, v in arrays.items()}

    def names(self) -> set[str]:
        return set(self._arrays)

    def _load(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._arrays[name].shape)


class GraphBuilder:
    """Records the nodes of one graph; ``op`` returns the output value so calls compose like math."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tape = ir.tape.Tape()
        self.inputs: list[ir.Value] = []
        self.outputs: list[ir.Value] = []
        self._scope: list[str] = [name]
        self._used_names: Counter[str] = Counter()
        self._constants: dict[tuple[str, bytes, tuple[int, ...]], ir.Value] = {}

    # -- naming ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def scope(self, name: str) -> Iterator[None]:
        """Prefix the names of the nodes recorded inside with ``name``: ``/model/layers.0/attn``."""
        self._scope.append(name)
        try:
            yield
        finally:
            self._scope.pop()

    def _unique(self, base: str) -> str:
        self._used_names[base] += 1
        n = self._used_names[base]
        return base if n == 1 else f"{base}_{n - 1}"

    def _path(self, leaf: str) -> str:
        return self._unique("/" + "/".join([*self._scope, leaf]))

    # -- graph IO -------------------------------------------------------------------------------
    def input(self, name: str, dtype: ir.DataType, shape: Sequence[Dim]) -> ir.Value:
        value = ir.val(name, dtype=dtype, shape=ir.Shape(list(shape)))
        self.inputs.append(value)
        return value

    def output(self, value: ir.Value, name: str, dtype: ir.DataType, shape: Sequence[Dim]) -> None:
        if value.is_graph_input() or value.is_graph_output() or value.is_initializer():
            value = self.op("Identity", value)
        value.name = name
        value.dtype = dtype
        value.shape = ir.Shape(list(shape))
        self.outputs.append(value)

    # -- initializers ---------------------------------------------------------------------------
    def weight(self, tensor: ir.TensorProtocol, name: str | None = None) -> ir.Value:
        """An initializer from a weight tensor (written to external data when saved)."""
        name = self._unique(name or tensor.name or "weight")
        value = ir.Value(
            name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
        )
        self.tape._initializers.append(value)
        return value

    def const(self, value: float | int | bool | Sequence | np.ndarray, dtype: type = np.int64) -> ir.Value:
        """A small constant (shape arithmetic, epsilons), shared by every node that needs the same one."""
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._constants:
            name = self._unique(f"const.{array.dtype.name}.{'x'.join(map(str, array.shape)) or 'scalar'}")
            v = ir.Value(
                name=name,
                shape=ir.Shape(array.shape),
                type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                const_value=ir.Tensor(array, name=name),
            )
            self.tape._initializers.append(v)
            self._constants[key] = v
        return self._constants[key]

    # -- nodes ----------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs: ir.Value | None, **attributes: object) -> ir.Value:
        """Record one node with a single output."""
        return self.tape.op(op_type, list(inputs), attributes or None, name=self._path(op_type))

    def ops(
        self, op_type: str, *inputs: ir.Value | None, num_outputs: int, **attributes: object
    ) -> Sequence[ir.Value]:
        """Record one node with several outputs (``Split``, ``TopK``)."""
        return self.tape.op_multi_out(
            op_type, list(inputs), attributes or None, num_outputs=num_outputs, name=self._path(op_type)
        )

    # -- shape helpers used by every graph ------------------------------------------------------
    def dim(self, x: ir.Value, axis: int) -> ir.Value:
        """``x.shape[axis]`` as a 1-element int64 tensor (the form Reshape and Concat want)."""
        if axis == -1:
            return self.op("Shape", x, start=-1)
        return self.op("Shape", x, start=axis, end=axis + 1)

    def slice(self, x: ir.Value, start: ir.Value | int, end: ir.Value | int, axis: int) -> ir.Value:
        """``x[start:end]`` along ``axis``; bounds are ints or 0-d int64 values."""

        def bound(v: ir.Value | int) -> ir.Value:
            return self.const([v]) if isinstance(v, int) else self.op("Unsqueeze", v, self.const([0]))

        return self.op("Slice", x, bound(start), bound(end), self.const([axis]))

    def shape_of(self, *parts: ir.Value | int) -> ir.Value:
        """Concatenate 1-element dims and literal ints into a shape tensor."""
        values = [p if isinstance(p, ir.Value) else self.const([p]) for p in parts]  # values: 1-element
        return values[0] if len(values) == 1 else self.op("Concat", *values, axis=0)

    # -- output ---------------------------------------------------------------------------------
    def build(self, doc: str = "") -> ir.Model:
        graph = ir.Graph(
            self.inputs,
            self.outputs,
            nodes=self.tape.nodes,
            initializers=self.tape.initializers,
            opset_imports={"": OPSET},
            name=self.name,
            doc_string=doc or None,
        )
        return ir.Model(graph, ir_version=IR_VERSION, producer_name="rlens")


def save(model: ir.Model, path: Path, progress: Callable[[int], None] | None = None) -> list[str]:
    """Write ``model`` to ``path`` with every weight in ``<name>.data`` beside it; return the files.

    Tensors are materialized one at a time while they are written, so saving a graph never holds a
    second copy of the checkpoint. ``progress`` is called with the byte count of each tensor written.
    """
    data_name = path.name + ".data"

    def callback(tensor: ir.TensorProtocol, info: object) -> None:
        if progress is not None:
            progress(tensor.nbytes)

    ir.save(
        model,
        path,
        external_data=data_name,
        size_threshold_bytes=1024,
        callback=callback,
        max_workers=1,
        max_in_flight_bytes=1,
    )
    files = [path.name]
    if (path.parent / data_name).exists():
        files.append(data_name)
    return files
