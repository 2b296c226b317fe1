"""rlens: export multimodal LLMs to static ONNX graphs with their visual-token redundancy cut out.

The data path is visible from the subpackages: ``exporter`` reads a transformers checkpoint and
writes an artifact directory, ``graphs`` builds each ONNX graph of it, ``runtime`` loads the
artifact and generates. Importing ``rlens`` itself pulls in neither torch nor transformers.
"""

from __future__ import annotations

from rlens.errors import RlensError

__version__ = "0.1.0"

__all__ = ["RlensError", "__version__"]
