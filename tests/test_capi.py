"""The C API (cpp/): librlens and its programs, built with CMake, answer as the Python runtime does.

They run on the shipped toy model (``rlens export toy``) and the README's example picture, so the
example's answer is a right one, not only the same tokens.

The library embeds this Python (``sys.executable``'s environment), so the tokens must be exactly
those of ``Pipeline.generate``. ``cpp/tests/capi_errors.c`` checks from C that every failure is a
non-zero status with a message, that two pipelines live in one process and that two threads both
get the right tokens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rlens.runtime.pipeline import Pipeline

ROOT = Path(__file__).resolve().parent.parent
CPP = ROOT / "cpp"
IMAGE = ROOT / "examples" / "toy.png"
PROMPT = "How many blue objects are there?"
ANSWER = "2"
MAX_NEW_TOKENS = 12


def missing_toolchain() -> str | None:
    if shutil.which("cmake") is None:
        return "cmake is not installed"
    if not any(shutil.which(cxx) for cxx in (os.environ.get("CXX", "c++"), "c++", "g++", "clang++")):
        return "no C++ compiler (c++, g++ or clang++) is installed"
    if not any(shutil.which(cc) for cc in (os.environ.get("CC", "cc"), "cc", "gcc", "clang")):
        return "no C compiler (cc, gcc or clang) is installed"
    return None


pytestmark = pytest.mark.skipif(missing_toolchain() is not None, reason=f"C API: {missing_toolchain()}")


def run(*args: str | Path, rlens_python: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a program; the embedded Python is the one built in unless ``rlens_python`` is given."""
    env = {k: v for k, v in os.environ.items() if k != "RLENS_PYTHON"}
    if rlens_python is not None:
        env["RLENS_PYTHON"] = rlens_python
    return subprocess.run(
        [str(a) for a in args], capture_output=True, encoding="utf-8", errors="replace", timeout=300, env=env
    )


@pytest.fixture(scope="session")
def capi_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """librlens, rlens_example and capi_errors, configured against this Python."""
    build = tmp_path_factory.mktemp("capi-build")
    configure = run(
        "cmake",
        "-S",
        CPP,
        "-B",
        build,
        f"-DPython_EXECUTABLE={sys.executable}",
        "-DRLENS_BUILD_TESTS=ON",
        "-DCMAKE_BUILD_TYPE=Release",
    )
    assert configure.returncode == 0, configure.stdout + configure.stderr
    compile_ = run("cmake", "--build", build, "-j2")
    assert compile_.returncode == 0, compile_.stdout + compile_.stderr
    return build


def test_example_streams_the_tokens_of_generate(capi_build: Path, toy_artifact: Path) -> None:
    expected = Pipeline.load(toy_artifact).generate(IMAGE, PROMPT, MAX_NEW_TOKENS)
    assert expected.text.strip() == ANSWER
    result = run(capi_build / "rlens_example", toy_artifact, IMAGE, PROMPT, str(MAX_NEW_TOKENS))
    assert result.returncode == 0, result.stderr
    text, tokens, visual = result.stdout.rsplit("\n", 3)[:3]
    assert tokens.split()[0] == "tokens:"
    assert [int(t) for t in tokens.split()[1:]] == expected.token_ids
    assert visual == f"visual_tokens: {expected.num_visual_tokens}"
    assert text == expected.text  # the streamed pieces add up to the answer


def test_example_reports_a_missing_directory(capi_build: Path, tmp_path: Path) -> None:
    result = run(capi_build / "rlens_example", tmp_path / "nope", IMAGE, PROMPT)
    assert result.returncode == 1
    assert result.stderr.startswith("error: ") and "does not exist" in result.stderr


def test_c_api_failures_pipelines_and_threads(capi_build: Path, toy_artifact: Path, tmp_path: Path) -> None:
    artifact = toy_artifact
    corrupt = tmp_path / "corrupt"
    shutil.copytree(artifact, corrupt)
    (corrupt / "decoder.onnx").write_bytes(b"not an onnx graph")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"not a png")
    expected = Pipeline.load(artifact).generate(IMAGE, PROMPT, MAX_NEW_TOKENS).token_ids
    result = run(
        capi_build / "capi_errors",
        artifact,
        corrupt,
        IMAGE,
        garbage,
        str(MAX_NEW_TOKENS),
        ",".join(map(str, expected)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout and "0 failure(s)" in result.stdout, result.stdout


def test_rlens_python_picks_the_environment(capi_build: Path, toy_artifact: Path, tmp_path: Path) -> None:
    example = (capi_build / "rlens_example", toy_artifact, IMAGE, PROMPT, "3")
    assert run(*example, rlens_python=sys.executable).returncode == 0
    result = run(*example, rlens_python=str(tmp_path / "no-python"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cannot import rlens" in result.stderr and "RLENS_PYTHON" in result.stderr, result.stderr
