"""Ray: the Serve application, its actors, the document-job store and the client SDK.

Only this subpackage imports Ray, FastAPI or DeepSpeed's distributed parts. A request, file by file:

    app.py            build_app: Ingress -> Engine, from the typed config (config.py)
    ingress.py        the FastAPI routes; bodies read and validated in schemas.py (wire.py: JSON/msgpack),
                      answers shaped in openai_format.py (streams: sse.py), errors in http_errors.py
                      (Ray's in ray_errors.py, shared with the job worker); /healthz and /metrics
                      bodies in engine_health.py
    job_store.py      the SQLite job store (records in job_types.py); job_worker.py runs its jobs,
                      a document's questions together (job_tasks.py)
    replica.py        the engine replica: forwards an events.Request to its shard actor
    shard_actor.py    holds the LLM; answers with the typed events of events.py
    client.py         the SDK (Client, AsyncClient; client_core.py, client_types.py)
    launcher.py       the embedded server (local Ray); cli_commands.py, demo.py: the CLI's part
    metrics.py        the project's metrics exported through Ray (engine_health.py: the app's /metrics)
"""
