"""vLLM's option names (issue 16 item 4): `entropyinfer serve MODEL` with vLLM's flags, `LLM(...)` and the
Serve config's `engine.llm` with vLLM's keywords, each with vLLM's meaning; one real `entropyinfer serve`
of a random-weight checkpoint started as a user would, answering over HTTP."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from entropyinfer import LLM, SamplingParams
from entropyinfer.cli import build_parser
from entropyinfer.cluster.cli_commands import serve_file_from_args
from entropyinfer.cluster.config import app_config
from entropyinfer.errors import ConfigError

VLLM_KEYWORDS = {
    "tensor_parallel_size": 1,
    "gpu_memory_utilization": 0.5,
    "max_model_len": 512,
    "max_num_seqs": 4,
    "max_num_batched_tokens": 1024,
    "enable_prefix_caching": False,
    "load_format": "dummy",
    "dtype": "half",
    "seed": 3,
}


def _serve(*argv: str):  # type: ignore[no-untyped-def]
    return serve_file_from_args(build_parser().parse_args(["serve", *argv]))


def test_serve_takes_the_model_positionally_and_vllms_flags(tiny_checkpoint: Path, tmp_path: Path) -> None:
    sf = _serve(
        str(tiny_checkpoint),
        "--tensor-parallel-size", "1",
        "--gpu-memory-utilization", "0.5",
        "--max-model-len", "512",
        "--max-num-seqs", "4",
        "--max-num-batched-tokens", "1024",
        "--no-enable-prefix-caching",
        "--load-format", "dummy",
        "--dtype", "half",
        "--seed", "3",
        "--host", "127.0.0.2",
        "--port", "8123",
        "--api-key", "secret",
        "--served-model-name", "tiny",
        "--db", str(tmp_path / "jobs.sqlite"),
    )  # fmt: skip
    llm = sf.app.engine.llm
    assert llm.model.model == str(tiny_checkpoint) and llm.model.load_format == "dummy"
    assert (llm.model.max_model_len, llm.model.dtype, llm.model.seed) == (512, "half", 3)
    assert (llm.engine.max_num_seqs, llm.engine.max_num_batched_tokens) == (4, 1024)
    assert llm.engine.gpu_memory_utilization == 0.5 and llm.engine.enable_prefix_caching is False
    assert llm.parallel.tensor_parallel_size == 1
    assert (sf.host, sf.port, sf.app.auth.api_key, sf.app.model_name) == ("127.0.0.2", 8123, "secret", "tiny")
    assert sf.args["engine"]["llm"]["max_model_len"] == 512  # what a cluster deploy sends
    assert _serve("--enable-prefix-caching").app.engine.llm.engine.enable_prefix_caching is True
    # unset flags leave the config file's values (configs/serve.yaml: smollm2-135m, entropy)
    default = _serve()
    assert default.app.engine.llm.model.model == "smollm2-135m" and default.app.engine.llm.policy == "entropy"
    assert default.app.engine.llm.model.seed is None and default.port == 8000
    assert _serve("--model", "smollm2-135m").app.engine.llm.model.model == "smollm2-135m"


def test_bad_serve_flags_name_what_is_wrong(tiny_checkpoint: Path) -> None:
    with pytest.raises(ConfigError, match="two models"):
        _serve(str(tiny_checkpoint), "--model", "smollm2-135m")
    with pytest.raises(ConfigError, match="gpu_memory_utilization"):
        _serve("--gpu-memory-utilization", "1.5")
    with pytest.raises(ConfigError, match="dtype"):
        _serve("--dtype", "float64")
    with pytest.raises(ConfigError, match="seed"):
        _serve("--seed", "-1")
    with pytest.raises(SystemExit):  # argparse: not an integer
        _serve("--max-num-seqs", "many")


def test_the_serve_config_and_llm_take_vllms_keywords(tiny_checkpoint: Path) -> None:
    config = app_config({"engine": {"llm": {"model": str(tiny_checkpoint), **VLLM_KEYWORDS}}}).engine.llm
    assert config.model.seed == 3 and config.engine.max_num_batched_tokens == 1024
    keywords = {**VLLM_KEYWORDS, "dtype": "float", "max_model_len": 256}
    llm = LLM(str(tiny_checkpoint), device="cpu", **keywords)
    assert llm.max_context == 256 and llm.dtype.is_floating_point and llm.dtype.itemsize == 4
    assert llm.config.engine.enable_prefix_caching is False and llm.config.engine.max_num_seqs == 4


def test_seed_gives_unseeded_sampled_requests_a_reproducible_stream(tiny_checkpoint: Path) -> None:
    sampled = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True)

    def tokens(seed: int | None) -> list[list[int]]:
        llm = LLM(str(tiny_checkpoint), device="cpu", load_format="dummy", seed=seed)
        return [llm.generate("hello", sampled)[0].token_ids for _ in range(2)]

    first, again, other = tokens(5), tokens(5), tokens(6)
    assert first == again  # same seed, same requests in the same order: the same tokens
    assert first[0] != first[1]  # each request its own seed from the stream
    assert other != first
    llm = LLM(str(tiny_checkpoint), device="cpu", load_format="dummy", seed=5)
    own = SamplingParams(max_tokens=12, temperature=1.0, ignore_eos=True, seed=11)
    free = LLM(str(tiny_checkpoint), device="cpu", load_format="dummy")
    assert llm.generate("hello", own)[0].token_ids == free.generate("hello", own)[0].token_ids  # its own wins


@pytest.mark.slow
@pytest.mark.serve
def test_entropyinfer_serve_model_starts_and_answers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    key = "cli-key"
    cmd = [sys.executable, "-m", "entropyinfer", "serve", str(tiny_checkpoint), "--load-format", "dummy"]
    cmd += ["--max-model-len", "512", "--max-num-seqs", "4", "--seed", "1", "--policy", "dense"]
    # --port 0: the server picks a free port once its Ray runs (a port picked here could be taken by Ray's
    # own processes before Serve binds it: the CI failure of fault_app) and prints its URL
    cmd += ["--port", "0", "--api-key", key, "--served-model-name", "tiny", "--quiet"]
    cmd += ["--db", str(tmp_path / "jobs.sqlite")]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "serve.log").open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    auth = {"Authorization": f"Bearer {key}"}
    try:
        deadline = time.monotonic() + 240
        while not (found := re.search(r"serving on (http://\S+)", (tmp_path / "serve.log").read_text())):
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "entropyinfer serve did not start"
            time.sleep(0.5)
        url = found.group(1)
        assert not url.endswith(":0")
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401  # --api-key is enforced
        models = httpx.get(url + "/v1/models", headers=auth, timeout=30).json()["data"]
        assert models[0]["id"] == "tiny" and models[0]["max_context"] == 512
        body = {"model": "tiny", "prompt": "hello", "max_tokens": 3, "ignore_eos": True}
        r = httpx.post(url + "/v1/completions", json=body, headers=auth, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3, r.text
    finally:
        procs = [proc.pid]  # its processes (Ray's included), listed while it still runs
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)  # Ctrl-C's path: stops the app and its Ray
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(60)
        for pid in procs:  # whatever is left of it, by pid
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        log.close()
