"""The CLI as a user meets it: answers, JSON, and one-line errors with a non-zero exit for bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Exported

import rlens.exporter.export as export_module
from rlens.cli.main import main as rlens_main
from rlens.tiny import TinySpec, make_tiny_llava


def rlens(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the installed ``rlens`` entry point in a subprocess, as a shell user would."""
    return subprocess.run(
        [sys.executable, "-m", "rlens.cli.main", *args], capture_output=True, text=True, timeout=300
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlens: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_run_json_reports_everything(exported: dict[str, Exported], image_file: Path) -> None:
    result = rlens(
        "run",
        str(exported["llama"].artifact),
        "--image",
        str(image_file),
        "--prompt",
        "What is in the picture?",
        "--max-new-tokens",
        "5",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert set(out) >= {
        "text",
        "token_ids",
        "prompt_ids",
        "num_visual_tokens",
        "ttft_ms",
        "decode_tokens_per_s",
    }
    assert out["num_visual_tokens"] == 16 and out["prompt_ids"].count(4) == 16
    assert 1 <= len(out["token_ids"]) <= 5 and out["ttft_ms"] > 0


def test_run_prints_the_answer(exported: dict[str, Exported], image_file: Path) -> None:
    args = [
        "run",
        str(exported["llama"].artifact),
        "--image",
        str(image_file),
        "--prompt",
        "Describe it.",
        "--max-new-tokens",
        "8",
    ]
    plain = rlens(*args)
    as_json = json.loads(rlens(*args, "--json").stdout)
    assert plain.returncode == 0
    assert plain.stdout == as_json["text"] + "\n"


def test_sampling_is_seeded(exported: dict[str, Exported], image_file: Path) -> None:
    args = [
        "run",
        str(exported["qwen2"].artifact),
        "--image",
        str(image_file),
        "--prompt",
        "Describe it.",
        "--max-new-tokens",
        "10",
        "--do-sample",
        "--temperature",
        "1.5",
        "--json",
    ]
    first = json.loads(rlens(*args, "--seed", "1").stdout)["token_ids"]
    assert json.loads(rlens(*args, "--seed", "1").stdout)["token_ids"] == first
    assert json.loads(rlens(*args, "--seed", "2").stdout)["token_ids"] != first


def test_export_refuses_a_missing_model_dir(tmp_path: Path) -> None:
    assert_one_line_error(
        rlens("export", str(tmp_path / "nope"), "-o", str(tmp_path / "out")), "does not exist"
    )
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_non_llava_dir(tmp_path: Path) -> None:
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    assert_one_line_error(rlens("export", str(tmp_path / "bert"), "-o", str(tmp_path / "out")), "not LLaVA")
    (tmp_path / "empty").mkdir()
    assert_one_line_error(
        rlens("export", str(tmp_path / "empty"), "-o", str(tmp_path / "out")), "config.json"
    )


def test_export_refuses_to_overwrite_a_foreign_directory(
    exported: dict[str, Exported], tmp_path: Path
) -> None:
    target = tmp_path / "precious"
    target.mkdir()
    (target / "notes.txt").write_text("keep me")
    assert_one_line_error(
        rlens("export", str(exported["llama"].checkpoint), "-o", str(target)), "not an rlens"
    )
    assert (target / "notes.txt").read_text() == "keep me"


def test_run_refuses_a_missing_artifact(tmp_path: Path) -> None:
    assert_one_line_error(rlens("run", str(tmp_path / "nope"), "--prompt", "hi"), "does not exist")


@pytest.fixture
def artifact_copy(exported: dict[str, Exported], tmp_path: Path) -> Path:
    copy = tmp_path / "artifact"
    shutil.copytree(exported["llama"].artifact, copy)
    return copy


def test_run_refuses_a_missing_graph(artifact_copy: Path) -> None:
    (artifact_copy / "decoder.onnx").unlink()
    assert_one_line_error(rlens("run", str(artifact_copy), "--prompt", "hi"), "decoder.onnx", "re-export")


def test_run_refuses_a_corrupt_graph(artifact_copy: Path) -> None:
    (artifact_copy / "vision.onnx").write_bytes(b"this is not a protobuf")
    assert_one_line_error(rlens("run", str(artifact_copy), "--prompt", "hi"), "vision.onnx", "re-export")


def test_run_refuses_another_manifest_version(artifact_copy: Path) -> None:
    manifest = json.loads((artifact_copy / "rlens.json").read_text())
    manifest["schema_version"] = 99
    (artifact_copy / "rlens.json").write_text(json.dumps(manifest))
    assert_one_line_error(rlens("run", str(artifact_copy), "--prompt", "hi"), "schema version 99")


def test_run_refuses_an_unreadable_image(exported: dict[str, Exported], tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    assert_one_line_error(
        rlens("run", str(exported["llama"].artifact), "--image", str(bad), "--prompt", "hi"), "bad.png"
    )


def test_run_refuses_a_prompt_longer_than_the_context(
    exported: dict[str, Exported], image_file: Path
) -> None:
    long_prompt = " ".join(["circle"] * 600)  # the tiny models have a 512-token context
    assert_one_line_error(
        rlens("run", str(exported["llama"].artifact), "--image", str(image_file), "--prompt", long_prompt),
        "context is 512",
    )


def test_an_interrupted_export_leaves_nothing(
    exported: dict[str, Exported], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "validate", fail)
    assert rlens_main(["export", str(exported["llama"].checkpoint), "-o", str(tmp_path / "out"), "-q"]) == 130
    assert list(tmp_path.iterdir()) == []


def test_a_diverging_export_is_refused(
    exported: dict[str, Exported],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # a tolerance nothing can meet stands in for graphs that diverge
    code = rlens_main(
        ["export", str(exported["llama"].checkpoint), "-o", str(tmp_path / "out"), "-q", "--atol", "0"]
    )
    assert code == 1 and "diverge" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_reexport_replaces_an_artifact(tmp_path: Path) -> None:
    checkpoint = make_tiny_llava(tmp_path / "ckpt", TinySpec(num_layers=1))
    out = tmp_path / "out"
    assert rlens_main(["export", str(checkpoint), "-o", str(out), "-q"]) == 0
    (out / "stale.txt").write_text("from an older export")
    assert rlens_main(["export", str(checkpoint), "-o", str(out), "-q"]) == 0
    assert not (out / "stale.txt").exists() and (out / "rlens.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "out"]


def test_rlens_export_entry_point_matches_subcommand() -> None:
    from rlens.cli.main import export_main

    with pytest.raises(SystemExit) as info:
        export_main(["--help"])
    assert info.value.code == 0


def test_make_tiny_writes_a_clip_that_trim_accepts(tmp_path: Path) -> None:
    result = rlens("make-tiny", str(tmp_path / "llava"), "--layers", "1", "--clip", str(tmp_path / "clip"))
    assert result.returncode == 0, result.stderr
    out = rlens(
        "export",
        str(tmp_path / "llava"),
        "-o",
        str(tmp_path / "out"),
        "-q",
        "--clip-model",
        str(tmp_path / "clip"),
        "--trim",
        "ratio:0.5",
        "--json",
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["trim"]["sample_tokens"] == 9 and summary["validation"]["trim_features"] < 1e-4
