"""Toy visual question answering: generated scenes of coloured shapes with questions whose answers are known.

:mod:`rlens.toy.data` draws the scenes and questions (numpy and Pillow only, deterministic from a seed);
``rlens eval`` scores an exported pipeline on a set written by it.

rlens ships a small LLaVA and its CLIP trained on such scenes by ``tools/train_toy.py``, in
``rlens/toy/weights/{llava,clip}`` (``save_pretrained`` format), with the Layer Ranking of that LLaVA in
``llava/ranking.json``. Wherever a checkpoint directory is asked for (``rlens export MODEL_DIR``,
``--clip-model``, ``rlens rank``), the name ``toy`` means the shipped one; a local directory called
``toy`` is still reachable as ``./toy``.
"""

from __future__ import annotations

from pathlib import Path

from rlens.errors import RlensError

TOY = "toy"
WEIGHTS = Path(__file__).resolve().parent / "weights"


def resolve(model_dir: str | Path, kind: str = "llava") -> Path:
    """``model_dir`` as a Path, or the shipped toy ``kind`` ("llava" or "clip") when it is ``"toy"``."""
    if str(model_dir) != TOY:
        return Path(model_dir)
    path = WEIGHTS / kind
    if not (path / "config.json").is_file():
        raise RlensError(
            f"the shipped toy {kind} is missing from {path}; reinstall rlens, or train it with "
            "`python tools/train_toy.py --install`"
        )
    return path
