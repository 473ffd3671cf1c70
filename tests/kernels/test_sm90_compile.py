"""Every Triton kernel under `kernels/` compiles for an H200 (sm_90) and fits its shared memory, on a
machine without a GPU: GPU-only compile failures (a layout the interpreter accepts and the NVIDIA backend
does not, a tile config over 227 KiB of shared memory) show up in CPU CI.

`sm90_compile.py` does the work in one subprocess for the module (without TRITON_INTERPRET, which this
suite's conftest sets, and with a fresh TRITON_CACHE_DIR so that it really compiles): it calls the real
wrappers in production shapes with their CUDA choices forced and compiles every distinct launch they make.
About 50 compiles, 40 s of CPU (1.5 min wall on this shared 2-core machine). It skips only when Triton here
has no CUDA backend or no ptxas for sm_90.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.slow

HELPER = Path(__file__).with_name("sm90_compile.py")
KERNELS = Path(__file__).resolve().parents[2] / "kernels"
SKIP_STATUS = 3  # sm90_compile.SKIP_STATUS (not imported: importing it here would import triton)
H200_MAX_SHARED = 232448


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("sm90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp / "triton-cache")
    out = tmp / "report.json"
    proc = subprocess.run(
        [sys.executable, str(HELPER), "--json", str(out)],
        env=env, capture_output=True, text=True, timeout=1200,
    )  # fmt: skip
    if proc.returncode == SKIP_STATUS:
        pytest.skip(proc.stdout.strip().removeprefix("SKIP: "))
    if proc.returncode not in (0, 1) or not out.exists():
        pytest.fail(f"{HELPER.name} exited {proc.returncode}:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    data: dict[str, Any] = json.loads(out.read_text())
    data["stdout"] = proc.stdout
    return data


def launched_kernels() -> set[str]:
    """``module:name`` of every kernel a wrapper in `kernels/` launches (``jit_kernel(<kernel>, ...)``)."""
    names = set()
    for path in KERNELS.glob("*.py"):
        if path.name == "backend.py":  # defines jit_kernel (its docstring shows a call)
            continue
        source = path.read_text()
        for name in re.findall(r"jit_kernel\(\s*(\w+)\s*,", source):
            names.add(name)
    return names


def test_every_launch_compiles_for_sm90(report: dict[str, Any]) -> None:
    assert report["results"], report["stdout"]
    errors = [f for f in report["failures"] if not f.startswith("shared memory")]
    assert not errors, "\n\n".join(errors)
    for r in report["results"]:
        assert r["cubin_bytes"] > 0, r


def test_shared_memory_fits_an_h200(report: dict[str, Any]) -> None:
    over = [
        f"{r['kernel']} {r['constexprs']} num_warps={r['num_warps']} num_stages={r['num_stages']} "
        f"({r['case']}): {r['shared']} B"
        for r in report["results"]
        if r["error"] is None and r["shared"] > H200_MAX_SHARED
    ]
    assert not over, f"over an H200 block's {H200_MAX_SHARED} B of shared memory:\n" + "\n".join(over)
    # the number is live: the pipelined attention tiles use shared memory (3 stages of K and V tiles)
    prefill = [r["shared"] for r in report["results"] if r["kernel"].endswith(":_sparse_prefill_fwd")]
    assert max(prefill) >= 64 * 1024


def test_every_kernel_is_compiled(report: dict[str, Any]) -> None:
    """Each kernel a wrapper launches was compiled; every other @triton.jit function is a device function
    called from one of them (compiled inside it)."""
    compiled = {r["kernel"].split(":")[1] for r in report["results"]}
    jit = {name.split(":")[1]: info for name, info in report["jit_functions"].items()}
    launched = launched_kernels()
    assert launched <= set(jit), f"launched but not @triton.jit functions of kernels/: {launched - set(jit)}"
    assert launched - compiled == set(), f"kernels never compiled: {sorted(launched - compiled)}"
    for name in set(jit) - launched:
        callers = [k for k in launched if re.search(rf"\b{name}\(", jit[k]["src"])]
        assert callers, f"@triton.jit {name} is neither launched by a wrapper nor called from a kernel"


def constexpr_values(report: dict[str, Any], kernel: str, name: str) -> set[Any]:
    return {r["constexprs"][name] for r in report["results"] if r["kernel"].endswith(f":{kernel}")}


def test_launches_take_the_cuda_paths(report: dict[str, Any]) -> None:
    """The wrappers' CUDA choices reached the compiles: the GPU tiles of the profiling row kernel (one row
    a program), an H200's split counts (132 SMs: a 4096-key sequence in 33 splits, merged 64 wide), and
    every constexpr branch the wrappers can take."""
    assert constexpr_values(report, "_entropy_kernel", "ROWS") == {1}
    assert constexpr_values(report, "_entropy_kernel", "SPREAD") == {False, True}
    assert 4096 in constexpr_values(report, "_entropy_kernel", "CHUNK")
    assert 64 in constexpr_values(report, "decode_merge_kernel", "BLOCK_S")
    assert constexpr_values(report, "_decode_split_kernel", "WRITE_OUT") == {False, True}
    assert constexpr_values(report, "_paged_decode_split_kernel", "WRITE_OUT") == {False, True}
    assert constexpr_values(report, "_sparse_prefill_fwd", "PAGED") == {False, True}
    assert constexpr_values(report, "_sparse_prefill_fwd", "HEAD_DIM") == {64, 128}
    assert constexpr_values(report, "_counts_kernel", "MODE") == {0, 1, 2}
    assert constexpr_values(report, "_counts_kernel", "CAUSAL") == {False, True}
    assert constexpr_values(report, "_select_kernel", "SINGLE") == {False, True}
    assert constexpr_values(report, "_rms_norm_kernel", "HAS_RESIDUAL") == {False, True}
    # H200 tiles of the sparse prefill (kernels/tiling.py): d = 128, 16-bit: 8 warps, 3 stages
    big = [r for r in report["results"] if r["kernel"].endswith(":_sparse_prefill_fwd")]
    assert {(r["num_warps"], r["num_stages"]) for r in big if r["constexprs"]["HEAD_DIM"] == 128} == {(8, 3)}
