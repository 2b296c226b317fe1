"""The TensorRT track: a static check of the graphs against TensorRT's ONNX parser, engines, their runtime.

``support`` is the table of what TensorRT 10's ONNX parser imports (written from onnx-tensorrt's
``docs/operators.md`` and changelog), ``check`` walks an artifact's graphs against it without a GPU
or the ``tensorrt`` package, ``engines`` builds engines with the ``tensorrt`` Python API where
one is installed, and ``runtime`` runs them behind an ONNX Runtime session's interface, refusing
engines built for another TensorRT release or GPU. Importing this package imports none of onnx,
tensorrt or torch.
"""

from __future__ import annotations
