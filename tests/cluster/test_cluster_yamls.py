"""Every `ray up` YAML in cluster/ passes Ray's own validator offline, and the Serve config its head
deploys loads with the project's typed loader (and with Ray's Serve schema)."""

from __future__ import annotations

import copy
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

pytest.importorskip("ray")
pytest.importorskip("jsonschema")

from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.schema import ServeDeploySchema

from entropyinfer.cluster.config import load_serve_file

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_YAMLS = sorted(
    p for p in (ROOT / "cluster").glob("*.yaml") if "provider" in yaml.safe_load(p.read_text())
)
REMOTE_CHECKOUT = "~/entropyinfer/"  # where file_mounts puts the repository on every node


def _load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def _deploy_command(config: dict[str, Any]) -> list[str]:
    for command in config["head_start_ray_commands"]:
        if "entropyinfer serve" in command or command.startswith("serve deploy"):
            return shlex.split(command)
    raise AssertionError("no head start command deploys the Serve app")


def test_there_are_three_providers() -> None:
    providers = {_load(p)["provider"]["type"] for p in CLUSTER_YAMLS}
    assert providers == {"aws", "gcp", "local"}


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_ray_validates_the_cluster_yaml(path: Path) -> None:
    config = _load(path)
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    if config["provider"]["type"] == "local":
        assert config["provider"]["head_ip"] and config["provider"]["worker_ips"]
    else:
        gpu_types = [t for t, spec in config["available_node_types"].items() if spec["resources"].get("GPU")]
        assert gpu_types, "a cloud cluster needs GPU worker node types"
        assert config["head_node_type"] not in gpu_types
    setup = " ".join(config["setup_commands"])
    assert re.search(r"pip install .*-e ~/entropyinfer", setup), "setup commands must install the project"
    assert config["file_mounts"]["~/entropyinfer"] == "."
    assert any(
        c.strip().startswith("ulimit") and "ray start --head" in c for c in config["head_start_ray_commands"]
    )


@pytest.mark.parametrize("path", CLUSTER_YAMLS, ids=lambda p: p.name)
def test_the_deployed_serve_config_loads(path: Path) -> None:
    argv = _deploy_command(_load(path))
    remote = argv[argv.index("--config") + 1] if "--config" in argv else argv[-1]
    assert remote.startswith(REMOTE_CHECKOUT)
    local = ROOT / remote.removeprefix(REMOTE_CHECKOUT)
    serve_file = load_serve_file(local)
    assert serve_file.import_path == "entropyinfer.cluster.app:build_app"
    ServeDeploySchema.model_validate(_load(local))

    from entropyinfer.cluster.cli_commands import serve_argument_parser

    args = serve_argument_parser().parse_args(argv[2:])  # after `entropyinfer serve`
    assert args.address == "auto" and args.detach and args.accelerator == "gpu"


def test_serve_yaml_rejects_unknown_keys(tmp_path: Path) -> None:
    from entropyinfer.errors import ConfigError

    data = _load(ROOT / "configs" / "serve.yaml")
    data["applications"][0]["args"]["engine"]["modle"] = "typo"
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match=r"applications\[0\]\.args\.engine\.modle"):
        load_serve_file(bad)
