"""The embedded default: Ray in this process, the Serve app on 127.0.0.1, SQLite in a local folder.

    with EmbeddedServer(config, port=8000) as server:   # starts local Ray, Serve, the app
        Client(server.url).run(...)
    # leaving the block deletes the app, shuts Serve and Ray down: no Ray process is left behind

`deploy_to_cluster` is the cluster path (used by the `ray up` YAMLs through `entropyinfer serve
--address auto --detach`): it submits the Serve config to a running cluster, like `serve deploy`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

from entropyinfer.cluster.config import ServeAppConfig, ServeFile, load_serve_file

log = logging.getLogger(__name__)

APP_NAME = "entropyinfer"
STOP_TIMEOUT_S = 60.0


def prepare_ray_env() -> None:
    """Environment for Ray started or joined from here: no usage-stats upload.

    Token authentication is never turned off here. Ray 2.60 turns it on for a new local `ray.init()`
    (the token is ~/.ray/auth_token, made on first use), and it has to stay on: only the Serve HTTP proxy
    binds 127.0.0.1, while the GCS, raylet, object manager and worker gRPC ports bind every interface
    whatever `_node_ip_address` says (Ray maps 127.0.0.1 to the node's routable IP), so without the
    token anyone on the network could run code in this process's cluster. Joining a cluster
    (`--address`), Ray uses the token when there is one."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


BIND_ATTEMPTS = 3


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def apply_overrides(
    serve_file: ServeFile,
    *,
    model: str | None = None,
    policy: str | None = None,
    accelerator: str | None = None,
    load_format: str | None = None,
    host: str | None = None,
    port: int | None = None,
    db_path: str | None = None,
    api_key: str | None = None,
) -> ServeFile:
    """The serve file with command-line overrides applied (re-validated by the typed loader)."""
    llm = {
        k: v for k, v in (("model", model), ("policy", policy), ("load_format", load_format)) if v is not None
    }
    engine: dict[str, Any] = {"llm": llm} if llm else {}
    if accelerator is not None:
        engine["accelerator"] = accelerator
    overrides: dict[str, Any] = {"engine": engine} if engine else {}
    if db_path is not None:
        overrides["jobs"] = {"db_path": db_path}
    if api_key is not None:
        overrides["auth"] = {"api_key": api_key}
    return dataclasses.replace(
        serve_file.with_args(overrides) if overrides else serve_file,
        host=host if host is not None else serve_file.host,
        port=port if port is not None else serve_file.port,
    )


class EmbeddedServer:
    """Local Ray + Serve + the entropyinfer app in this process. Not reentrant; one per process."""

    def __init__(
        self,
        config: ServeAppConfig,
        *,
        host: str = "127.0.0.1",
        port: int | None = 8000,
        app_name: str = APP_NAME,
        log_to_driver: bool = False,
        num_cpus: int | None = None,
        metrics_port: int | None = None,
    ) -> None:
        self.config = config
        self.metrics_port = metrics_port  # Prometheus endpoint of Ray's metrics agent (None: Ray picks one)
        self.host = host
        # Port 0 / None: pick a free one after Ray has started (Ray's own processes take random ports
        # too, so a port picked earlier can be gone by the time Serve's proxy binds it).
        self._auto_port = not port
        self.port = port or 0
        self.app_name = app_name
        self.log_to_driver = log_to_driver
        self.num_cpus = num_cpus
        self._owns_ray = False

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def __enter__(self) -> EmbeddedServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        """Start Ray (unless this process already runs one), Serve and the app; returns the URL."""
        prepare_ray_env()
        import ray

        if not ray.is_initialized():
            # Unset, Ray turns token auth on for the new cluster itself (and refreshes its cached config,
            # which setting RAY_AUTH_MODE here would not, were Ray's config read before in this process).
            if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
                log.warning(
                    "RAY_AUTH_MODE=disabled: Ray's internal ports listen on every network interface, so "
                    "anyone who can reach this machine can run code in it; unset it to keep token auth"
                )
            ray.init(
                address="local",
                include_dashboard=False,
                log_to_driver=self.log_to_driver,
                num_cpus=self.num_cpus,
                namespace="entropyinfer",
                _metrics_export_port=self.metrics_port,
            )
            self._owns_ray = True
        try:
            self._start_serve()
            self.deploy()
        except BaseException:  # Ctrl-C or a failed deploy: leave no Ray processes behind
            self.stop()
            raise
        return self.url

    def _start_serve(self) -> None:
        from ray import serve

        for attempt in range(BIND_ATTEMPTS):
            if self._auto_port:
                self.port = free_port(self.host)
            try:
                serve.start(http_options={"host": self.host, "port": self.port}, proxy_location="HeadOnly")
                return
            except Exception as e:
                if not self._auto_port or "bind" not in str(e) or attempt == BIND_ATTEMPTS - 1:
                    raise
                log.warning("port %d was taken before Serve could bind it; trying another", self.port)
                serve.shutdown()

    def deploy(self, config: ServeAppConfig | None = None) -> None:
        """(Re)deploy the app and wait until it serves (the model is loaded)."""
        from ray import serve

        from entropyinfer.cluster.app import build_app

        if config is not None:
            self.config = config
        t0 = time.perf_counter()
        serve.run(build_app(self.config), name=self.app_name, route_prefix="/")
        log.info("entropyinfer app ready at %s in %.1fs", self.url, time.perf_counter() - t0)

    def restart_app(self) -> None:
        """Delete the application and deploy it again (fresh replicas; the SQLite store persists)."""
        from ray import serve

        serve.delete(self.app_name)
        self.deploy()

    def stop(self) -> None:
        """Delete the app, stop Serve and (if started here) Ray and its processes."""
        import ray
        from ray import serve

        if not ray.is_initialized():
            return
        # Graceful first (replicas hand running jobs back to the queue), bounded in time: if Ray is
        # already half down (a signal reached the raylet too), shut down anyway.
        deleter = threading.Thread(target=serve.delete, args=(self.app_name,), daemon=True)
        deleter.start()
        deleter.join(STOP_TIMEOUT_S)
        if deleter.is_alive():
            log.warning("deleting the Serve app did not finish in %.0fs; shutting Ray down", STOP_TIMEOUT_S)
        if self._owns_ray:
            ray.shutdown()  # stops Serve's actors and every Ray process this process started
            self._owns_ray = False


def embedded_server(
    config_path: str | Path = "serve",
    *,
    model: str | None = None,
    host: str | None = None,
    port: int | None = None,
    db_path: str | None = None,
    api_key: str | None = None,
    log_to_driver: bool = False,
) -> EmbeddedServer:
    """An EmbeddedServer for a Serve config file (default configs/serve.yaml) with overrides."""
    sf = apply_overrides(
        load_serve_file(config_path), model=model, host=host, port=port, db_path=db_path, api_key=api_key
    )
    return EmbeddedServer(sf.app, host=sf.host, port=sf.port, log_to_driver=log_to_driver)


def deploy_to_cluster(serve_file: ServeFile, *, address: str = "auto", dashboard: str | None = None) -> None:
    """Submit the app to a running Ray cluster through the dashboard's REST API (what `serve deploy`
    does) and return at once; the cluster builds it and the autoscaler adds the nodes it needs."""
    prepare_ray_env()
    from ray.dashboard.modules.serve.sdk import ServeSubmissionClient

    config = {
        "proxy_location": "HeadOnly",
        "http_options": {"host": serve_file.host, "port": serve_file.port},
        "applications": [
            {
                "name": serve_file.app_name,
                "route_prefix": serve_file.route_prefix,
                "import_path": serve_file.import_path,
                "args": serve_file.args,  # as written in the file, with the overrides merged
            }
        ],
    }
    url = dashboard or os.environ.get("RAY_DASHBOARD_ADDRESS") or "http://127.0.0.1:8265"
    ServeSubmissionClient(url).deploy_applications(config)
    log.info("submitted %s to the cluster at %s (address %s)", serve_file.app_name, url, address)
