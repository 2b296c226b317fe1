"""Question sets as JSON lines: the calibration files of `rlens rank` and the data of `rlens eval`.

One line per question: ``{"image": path, "prompt": str, "answer": str, "kind": str}``. ``answer``
is optional for calibration (the unreduced model's own answer stands in), required for
evaluation; ``kind`` is optional everywhere. Relative image paths resolve against the file's
directory, so a set moves as a folder. Images are read up front, so a bad file fails before any
model loads, and every problem is one line naming the line of the file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from rlens.errors import RlensError

DEFAULT_KIND = "all"


@dataclass(frozen=True)
class Question:
    image: Image.Image
    prompt: str
    answer: str | None
    kind: str
    line: int


def read_questions(
    path: str | Path, *, what: str, answer_required: bool, limit: int | None = None, hint: str = ""
) -> list[Question]:
    """Parse a question set; ``what`` names the file in messages, ``limit`` keeps the first N."""
    path = Path(path)
    keys = (
        '"image", "prompt" and "answer"' if answer_required else '"image" and "prompt" ("answer" is optional)'
    )
    if not path.is_file():
        raise RlensError(
            f"{what} '{path}' does not exist; give a JSON-lines file with one object per line, "
            f"with {keys}{hint}"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise RlensError(f"cannot read {what} '{path}' ({' '.join(str(e).split())})") from e
    questions: list[Question] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if limit is not None and len(questions) >= limit:
            break
        if line.strip():
            questions.append(_question(path, number, line, answer_required, keys))
    if not questions:
        raise RlensError(f"{what} '{path}' has no samples")
    return questions


def _question(path: Path, number: int, line: str, answer_required: bool, keys: str) -> Question:
    where = f"{path}, line {number}"
    try:
        record = json.loads(line)
    except ValueError as e:
        raise RlensError(f"{where}: not valid JSON ({e}); write one object per line") from e
    if not isinstance(record, dict):
        raise RlensError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("image", "prompt", *(("answer",) if answer_required else ())):
        if not isinstance(record.get(key), str):
            raise RlensError(f'{where}: missing string key "{key}"; every line needs {keys}')
    answer = record.get("answer")
    if answer is not None and not isinstance(answer, str):
        raise RlensError(f'{where}: "answer" must be a string')
    kind = record.get("kind", DEFAULT_KIND)
    if not isinstance(kind, str) or not kind:
        raise RlensError(f'{where}: "kind" must be a non-empty string')
    image_path = Path(record["image"]).expanduser()
    image_path = image_path if image_path.is_absolute() else path.parent / image_path
    try:
        with Image.open(image_path) as opened:
            image = opened.convert("RGB")
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise RlensError(f"{where}: cannot read image '{image_path}' ({reason})") from e
    return Question(image, record["prompt"], answer, kind, number)
