"""``--precision``: what the decoder's MatMul weights are stored as, and how close the result must stay.

The numbers that matter to the CLI and the bench live here, apart from ``rlens.graphs.quantize``
(which needs numpy and onnx_ir), so listing the choices imports nothing heavy.
"""

from __future__ import annotations

PRECISIONS: dict[str, int | None] = {"fp32": None, "fp16": None, "int8": 8, "int4": 4}
"""``--precision`` -> bits per weight of the decoder's quantized MatMuls (None: a float type, no blocks).

fp16 is the decoder as a whole in float16 (``rlens.graphs.half``), for GPUs: ONNX Runtime's CUDA
provider and TensorRT. On a CPU ONNX Runtime runs most float16 kernels by casting to float32 around
them, so it validates there but is not fast there."""

FLOAT_BYTES: dict[str, float] = {"fp32": 4.0, "fp16": 2.0}
"""Bytes per weight of the float precisions."""


def is_quantized(precision: str) -> bool:
    """Whether ``precision`` stores MatMul weights as ONNX Runtime's ``MatMulNBits`` blocks (not for
    TensorRT, whose graphs hold standard ONNX operators only)."""
    return PRECISIONS[precision] is not None


BLOCK_SIZE: dict[str, int] = {"int8": 128, "int4": 32}
"""Weights per scale and zero point along K: accuracy where bits are scarce, speed where they are not.

int8: 128. On the first shipped toy weights blocks of 32 and 128 give the same logit error (6.8e-3, 6.0e-3)
and the same answers as fp32 on all 400 questions of a toy eval set; 128 runs a 256 x 4096 x 4096
prefill MatMul in 39 ms where 32 takes 63 (fp32: 57), a decode step in 0.63 ms against 0.74 (2.4).
int4: 32. Blocks of 128 raise the toy's logit error from 0.071 to 0.106 and the weights' rms error
from 8.0% to 9.7% (answers agree with fp32 on 93.5% and 94% of the 400: too few to tell apart); 32
pays for it in prefill, 71 ms on the same MatMul against 42 for 128, and decodes in 0.47 ms (0.36).
Measured with ONNX Runtime 1.31 on one core of an AVX-512 VNNI CPU.
"""

DEFAULT_ATOL: dict[str, float] = {"fp32": 1e-3, "fp16": 0.02, "int8": 0.1, "int4": 0.5}
"""``rlens export``'s validation tolerance when no ``--atol`` is given, relative to max(1, |reference|).

fp32 differs from PyTorch by summation order only. fp16 sits ten times above the largest error
measured at export (tiny checkpoints 1.1e-3, the toy model 5.9e-4, a random LLaVA-1.5-7B-geometry
model at 16 layers 2.0e-3). The quantized defaults sit above the largest
error measured on the tiny test checkpoints (random weights, the worst case: int8 0.034, int4 0.31 at
validation, 0.43 somewhere along a 16-token answer) and on the shipped toy model (int8 0.020, int4
0.078), and below what a scrambled weight layout gives (0.8 to 1.8).
"""


def weight_bytes(precision: str) -> float:
    """Bytes per weight of a quantized MatMul, its share of a block's fp32 scale and zero point included."""
    bits = PRECISIONS[precision]
    if bits is None:
        return FLOAT_BYTES[precision]
    return bits / 8 + (4 + bits / 8) / BLOCK_SIZE[precision]
