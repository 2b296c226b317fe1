"""The embedding graph: token ids plus image features -> ``inputs_embeds``.

Every image placeholder id in ``input_ids`` is replaced, in row-major order, by the next row of
``image_features`` (as transformers' ``masked_scatter`` does), so a prompt carries exactly as many
placeholders as the vision graph produced rows. Decode steps pass zero image rows.

Each placeholder finds its row by a running count (CumSum) and a Gather, not by NonZero and
ScatterND: no tensor's size depends on the data, which TensorRT handles without device-side sizes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from rlens.graphs.builder import FLOAT, INT64, GraphBuilder, Weights


def build_embedding(vocab_size: int, hidden_size: int, image_token_id: int, weights: Weights) -> ir.Model:
    """input_ids [B, S], image_features [N, d] -> inputs_embeds [B, S, d].

    ``weights`` holds the token table as ``embed_tokens.weight``.
    """
    b = GraphBuilder("embedding")
    ids = b.input("input_ids", INT64, ["batch", "sequence"])
    image_features = b.input("image_features", FLOAT, ["num_image_tokens", hidden_size])
    is_image = b.op("Equal", ids, b.const(image_token_id))
    text_ids = b.op("Where", is_image, b.const(0), ids)  # placeholder ids may lie outside the table
    embeds = b.op("Gather", b.weight(weights.get("embed_tokens.weight")), text_ids, axis=0)  # [B, S, d]
    flat = b.op("Reshape", is_image, b.const([-1]))  # [B*S]
    rank = b.op("Sub", b.op("CumSum", b.op("Cast", flat, to=INT64), b.const(0)), b.const(1))  # row of each
    n = b.dim(image_features, 0)  # [1]
    rows = b.op("Concat", image_features, b.const(np.zeros((1, hidden_size)), np.float32), axis=0)  # [N+1, d]
    picked = b.op("Gather", rows, b.op("Where", flat, b.op("Min", rank, n), n), axis=0)  # [B*S, d]
    picked = b.op("Reshape", picked, b.op("Shape", embeds))  # [B, S, d]
    b.output(
        b.op("Where", b.op("Unsqueeze", is_image, b.const([-1])), picked, embeds),
        "inputs_embeds",
        FLOAT,
        ["batch", "sequence", hidden_size],
    )
    return b.build("rlens embedding: token ids + image features -> inputs_embeds")
