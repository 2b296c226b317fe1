"""What TensorRT 10's ONNX parser imports: operators, their data types and documented restrictions.

Sources (read, and the table below written from them; nothing is copied at run time):

- onnx-tensorrt ``docs/operators.md`` for TensorRT 10.15, "Operator Support Matrix"
  (https://github.com/onnx/onnx-tensorrt/blob/main/docs/operators.md): the operator list, the
  "Supported Types" column and the "Restrictions" column; "TensorRT 10.15 supports operators in
  the inclusive range of opset 9 to opset 24".
- The same file at TensorRT 10.0: "opset 9 to opset 20".
- onnx-tensorrt ``docs/Changelog.md``: operators added during 10.x (DeformConv 10.1; the window
  functions 10.4; STFT 10.5; Attention 10.14; RMSNormalization, RotaryEmbedding, TensorScatter
  10.15), tensor ``axes`` accepted by Slice from 10.3 and by Pad from 10.4, and the ONNX release
  the parser was built with (1.17 from 10.6, 1.18 from 10.11). The opset ceilings between the two
  documented ones are read from those ONNX releases (1.17 defines opset 22, 1.18 opset 23); the
  10.0 document's own pairing (opset 20) keeps the releases before 10.6 at 20.
- Where the "Supported Types" column is narrower than what TensorRT 10 imports, the wider set is
  taken from the importer or the layer's own reference, and named in ``WIDER_TYPES``.

A target version newer than the newest table here is checked against that table (its operators
only grow between minor versions); a version older than 10.0 is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlens.errors import RlensError

NEWEST = (10, 15)
"""The TensorRT version whose operators.md the table below is written from."""

_MAX_OPSET = ((0, 20), (6, 22), (11, 23), (15, 24))
"""(first 10.x minor version, highest opset its parser documents), oldest first."""

MIN_OPSET = 9

TOPK_MAX_K = 3840
"""operators.md, TopK: "``K`` input must be less than 3840"."""

SLICE_TENSOR_AXES_SINCE = 3
"""Changelog 10.3: "Added support for tensor ``axes`` inputs for ``Slice`` nodes"."""

PAD_TENSOR_AXES_SINCE = 4
"""Changelog 10.4: "Added support for tensor ``axes`` for ``Pad`` operations"."""

# ONNX TensorProto element types (onnx.TensorProto.DataType values) -> the type names of
# operators.md. DOUBLE is "cast down to FLOAT" by the parser, so it counts as FP32.
ONNX_TYPE_NAMES: dict[int, str] = {
    1: "FP32",
    2: "UINT8",
    3: "INT8",
    4: "UINT16",
    5: "INT16",
    6: "INT32",
    7: "INT64",
    8: "STRING",
    9: "BOOL",
    10: "FP16",
    11: "FP32",
    12: "UINT32",
    13: "UINT64",
    14: "COMPLEX64",
    15: "COMPLEX128",
    16: "BF16",
    17: "FP8",
    18: "FLOAT8E4M3FNUZ",
    19: "FLOAT8E5M2",
    20: "FLOAT8E5M2FNUZ",
    21: "UINT4",
    22: "INT4",
    23: "FP4",
}

IO_TYPES = frozenset(
    {"FP32", "FP16", "BF16", "INT32", "INT64", "INT8", "UINT8", "BOOL", "FP8", "INT4", "FP4"}
)
"""Types an engine input or output may have ("TensorRT supports the following ONNX data types")."""


@dataclass(frozen=True)
class Target:
    """The TensorRT release a check is for; ``minor`` decides the version-dependent rules."""

    major: int
    minor: int

    @property
    def name(self) -> str:
        return f"{self.major}.{self.minor}"

    @property
    def max_opset(self) -> int:
        return max(opset for since, opset in _MAX_OPSET if since <= self.minor)

    @property
    def beyond_table(self) -> bool:
        """True when this version is newer than the newest operators.md the table comes from."""
        return (self.major, self.minor) > NEWEST


def parse_target(text: str) -> Target:
    """``"10.15"``, ``"10.8.0"`` or ``"10"`` (10.0) -> Target; anything but TensorRT 10 is refused."""
    parts = text.strip().split(".")
    try:
        numbers = [int(p) for p in parts]
    except ValueError:
        numbers = []
    if not numbers or numbers[0] != 10 or len(numbers) > 4 or any(n < 0 for n in numbers):
        raise RlensError(
            f"--trt-version {text!r}: this check knows TensorRT 10 (10.0 to {NEWEST[0]}.{NEWEST[1]}); "
            "give it as 10.x"
        )
    return Target(10, numbers[1] if len(numbers) > 1 else 0)


@dataclass(frozen=True)
class OpSupport:
    """One row of the support matrix: the types TensorRT imports the op with, and since when."""

    types: frozenset[str]
    since: int = 0
    """The first TensorRT 10 minor version whose parser imports the op."""
    restriction: str = ""
    """The documented restriction, in operators.md's words (checked in ``rlens.tensorrt.check``)."""


def _types(*names: str) -> frozenset[str]:
    return frozenset(names)


F = _types("FP32", "FP16", "BF16")
FI = F | {"INT32", "INT64"}
FIB = FI | {"BOOL"}
F16 = _types("FP32", "FP16")
BOOL = _types("BOOL")
CONSTANTS = FI | {"BOOL", "FP8", "FP4", "INT4"}

_AXES_INITIALIZER = "`axes` must be an initializer"

OPERATORS: dict[str, OpSupport] = {
    "Abs": OpSupport(FI),
    "Acos": OpSupport(F),
    "Acosh": OpSupport(F),
    "Add": OpSupport(FI),
    "And": OpSupport(BOOL),
    "ArgMax": OpSupport(FI),
    "ArgMin": OpSupport(FI),
    "Asin": OpSupport(F),
    "Asinh": OpSupport(F),
    "Atan": OpSupport(F),
    "Atanh": OpSupport(F),
    "Attention": OpSupport(F | {"INT8", "FP8"}, 14, "`Q`, `K`, `V` and `attn_mask` must be 4D"),
    "AveragePool": OpSupport(F, 0, "2D or 3D Pooling only"),
    "BatchNormalization": OpSupport(F),
    "BlackmanWindow": OpSupport(F16, 4),
    "Cast": OpSupport(FIB | {"UINT8"}),
    "CastLike": OpSupport(FIB | {"UINT8"}),
    "Ceil": OpSupport(F),
    "Celu": OpSupport(F),
    "Clip": OpSupport(F),
    "Concat": OpSupport(FIB),
    "Constant": OpSupport(CONSTANTS, 0, "`sparse_value`, `value_string` and `value_strings` are unsupported"),
    "ConstantOfShape": OpSupport(CONSTANTS),
    "Conv": OpSupport(F),
    "ConvTranspose": OpSupport(F),
    "Cos": OpSupport(F),
    "Cosh": OpSupport(F),
    "CumSum": OpSupport(F, 0, "`axis` must be a build-time constant"),
    "DeformConv": OpSupport(F16, 1),
    "DepthToSpace": OpSupport(FI),
    "DequantizeLinear": OpSupport(_types("INT8", "FP8", "FP4", "INT4"), 0, "`x_zero_point` must be zero"),
    "Div": OpSupport(FI),
    "Dropout": OpSupport(F, 0, "`is_training` must be an initializer and evaluate to False"),
    "Einsum": OpSupport(F),
    "Elu": OpSupport(F),
    "Equal": OpSupport(FI),
    "Erf": OpSupport(F),
    "Exp": OpSupport(F),
    "Expand": OpSupport(FIB),
    "EyeLike": OpSupport(FIB, 0, "`input` must have static dimensions"),
    "Flatten": OpSupport(FIB),
    "Floor": OpSupport(F),
    "Gather": OpSupport(FIB),
    "GatherElements": OpSupport(FIB),
    "GatherND": OpSupport(FIB),
    "Gelu": OpSupport(F | {"INT8", "INT32", "INT64"}),
    "Gemm": OpSupport(F),
    "GlobalAveragePool": OpSupport(F),
    "GlobalLpPool": OpSupport(F),
    "GlobalMaxPool": OpSupport(F),
    "Greater": OpSupport(FI),
    "GreaterOrEqual": OpSupport(FI),
    "GridSample": OpSupport(F16, 0, "input must be 4D"),
    "GroupNormalization": OpSupport(F),
    "GRU": OpSupport(F),
    "HammingWindow": OpSupport(F16, 4),
    "HannWindow": OpSupport(F16, 4),
    "HardSigmoid": OpSupport(F),
    "HardSwish": OpSupport(F),
    "Hardmax": OpSupport(F, 0, "`axis` dimension of input must be a build-time constant"),
    "Identity": OpSupport(FIB),
    "If": OpSupport(FIB),
    "ImageScaler": OpSupport(F),
    "InstanceNormalization": OpSupport(F),
    "IsInf": OpSupport(F),
    "IsNaN": OpSupport(FI),
    "LayerNormalization": OpSupport(F, 0, "only the first output `Y` is supported"),
    "LeakyRelu": OpSupport(F),
    "Less": OpSupport(FI),
    "LessOrEqual": OpSupport(FI),
    "Log": OpSupport(F),
    "LogSoftmax": OpSupport(F),
    "Loop": OpSupport(FIB, 0, "scan output length cannot be dynamic"),
    "LRN": OpSupport(F),
    "LSTM": OpSupport(F),
    "LpNormalization": OpSupport(F),
    "LpPool": OpSupport(F),
    "MatMul": OpSupport(F),
    "Max": OpSupport(FI),
    "MaxPool": OpSupport(F, 0, "`Indices` output tensor unsupported"),
    "Mean": OpSupport(F | {"FP8", "INT32", "INT64"}),
    "MeanVarianceNormalization": OpSupport(F),
    "Min": OpSupport(FI),
    "Mish": OpSupport(F16),
    "Mod": OpSupport(FI),
    "Mul": OpSupport(FI),
    "Neg": OpSupport(FI),
    "NonMaxSuppression": OpSupport(F16),
    "NonZero": OpSupport(F16),
    "Not": OpSupport(BOOL),
    "OneHot": OpSupport(FIB, 0, "`depth` must be a build-time constant"),
    "Or": OpSupport(BOOL),
    "Pad": OpSupport(FI),
    "ParametricSoftplus": OpSupport(F),
    "Pow": OpSupport(FI),
    "PRelu": OpSupport(F),
    "QuantizeLinear": OpSupport(F, 0, "`y_zero_point` must be 0"),
    "RandomNormal": OpSupport(F),
    "RandomNormalLike": OpSupport(F),
    "RandomUniform": OpSupport(F),
    "RandomUniformLike": OpSupport(F),
    "Range": OpSupport(FI),
    "Reciprocal": OpSupport(F),
    **{
        f"Reduce{kind}": OpSupport(FI, 0, _AXES_INITIALIZER)
        for kind in ("L1", "L2", "LogSum", "LogSumExp", "Max", "Mean", "Min", "Prod", "Sum", "SumSquare")
    },
    "Relu": OpSupport(FI),
    "Reshape": OpSupport(FIB),
    "Resize": OpSupport(F),
    "ReverseSequence": OpSupport(FIB),
    "RMSNormalization": OpSupport(F, 15),
    "RNN": OpSupport(F),
    "RoiAlign": OpSupport(F16),
    "RotaryEmbedding": OpSupport(F, 15, "`position_ids` must be INT64"),
    "Round": OpSupport(F),
    "STFT": OpSupport(_types("FP32"), 5, "`frame_step` and `window` must be an initializer"),
    "ScaledTanh": OpSupport(F),
    "Scan": OpSupport(F),
    "Scatter": OpSupport(FI),
    "ScatterElements": OpSupport(FI),
    "ScatterND": OpSupport(FI, 0, "`reduction` other than `none` is not supported"),
    "Selu": OpSupport(F),
    "Shape": OpSupport(FIB),
    "Shrink": OpSupport(FI),
    "Sigmoid": OpSupport(F),
    "Sign": OpSupport(FI),
    "Sin": OpSupport(F),
    "Sinh": OpSupport(F),
    "Size": OpSupport(FIB),
    "Slice": OpSupport(FIB),
    "Softmax": OpSupport(F),
    "Softplus": OpSupport(F),
    "Softsign": OpSupport(F),
    "SpaceToDepth": OpSupport(FI),
    "Split": OpSupport(FIB),
    "Sqrt": OpSupport(F),
    "Squeeze": OpSupport(FIB, 0, "`axes` must be resolvable to a constant"),
    "Sub": OpSupport(FI),
    "Sum": OpSupport(FI),
    "Tan": OpSupport(F),
    "Tanh": OpSupport(F),
    "TensorScatter": OpSupport(F | {"INT32"}, 15, "`past_cache` and `update` must be 4D, `axis` must be -2"),
    "ThresholdedRelu": OpSupport(F),
    "Tile": OpSupport(FIB),
    "TopK": OpSupport(FI, 0, f"`sorted` must be 1; `K` input must be less than {TOPK_MAX_K}"),
    "Transpose": OpSupport(FIB),
    "Trilu": OpSupport(FIB),
    "Unsqueeze": OpSupport(FIB, 0, "`axes` must be resolvable to a constant"),
    "Upsample": OpSupport(F),
    "Where": OpSupport(FIB),
    "Xor": OpSupport(BOOL),
}

UNSUPPORTED = frozenset(
    {
        "AffineGrid",
        "Bernoulli",
        "BitShift",
        "BitwiseAnd",
        "BitwiseNot",
        "BitwiseOr",
        "BitwiseXor",
        "Col2Im",
        "CenterCropPad",
        "Compress",
        "ConcatFromSequence",
        "ConvInteger",
        "DFT",
        "Det",
        "DynamicQuantizeLinear",
        "ImageDecoder",
        "MatMulInteger",
        "MaxRoiPool",
        "MaxUnpool",
        "MelWeightMatrix",
        "Multinomial",
        "NegativeLogLikelihoodLoss",
        "Optional",
        "OptionalGetElement",
        "OptionalHasElement",
        "QLinearConv",
        "QLinearMatMul",
        "RegexFullMatch",
        "SequenceAt",
        "SequenceConstruct",
        "SequenceEmpty",
        "SequenceErase",
        "SequenceInsert",
        "SequenceLength",
        "SequenceMap",
        "SoftmaxCrossEntropyLoss",
        "SplitToSequence",
        "StringConcat",
        "StringNormalizer",
        "StringSplit",
        "TfIdfVectorizer",
        "Unique",
    }
)
"""Operators operators.md marks "N": the parser has no importer (a plugin of that name would be tried)."""

WIDER_TYPES: dict[str, tuple[frozenset[str], str]] = {
    "Clip": (
        _types("INT32", "INT64"),
        "onnx-tensorrt onnxOpImporters.cpp, Clip: INT32/INT64 inputs go through elementwise max/min",
    ),
    "CumSum": (
        _types("INT32", "INT64"),
        "TensorRT operator reference, Cumulative: SUM takes int32, int64, float16, float32, bfloat16",
    ),
    "NonZero": (
        _types("BOOL", "INT32"),
        "TensorRT INonZeroLayer reference: the input may be kFLOAT, kHALF, kINT32 or kBOOL",
    ),
}
"""Types the parser imports beyond operators.md's column, with where that is stated."""


def supported_types(op: str) -> frozenset[str]:
    wider = WIDER_TYPES.get(op)
    return OPERATORS[op].types | (wider[0] if wider else frozenset())
