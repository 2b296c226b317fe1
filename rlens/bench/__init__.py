"""``rlens bench``: transformers eager against the exported pipeline, with and without reductions.

One random-initialized LLaVA of a named geometry (``model``) runs through transformers ``generate``
and through ``rlens.runtime.Pipeline`` exported unreduced, with Hollow Attention + PAD-FFN on the
upper half of the layers, with TRIM, and with both. Each is measured in its own process
(``measure``): time to first token, decode tokens/s, peak resident memory, visual tokens; prefill
FLOPs come from ``rlens.flops`` and are set against a GEMM peak measured in the same run. Figures
for the real depth are composed from stage times and checked at the built depth (``compose``);
``report`` turns it all into JSON, markdown and a chart.
"""

from __future__ import annotations

from rlens.bench.model import CONFIGS, GEOMETRIES
from rlens.bench.run import BenchOptions, run_bench

__all__ = ["CONFIGS", "GEOMETRIES", "BenchOptions", "run_bench"]
