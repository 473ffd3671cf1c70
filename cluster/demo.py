"""The README's main job: start the embedded server, submit a batch of real documents with a question
through the SDK (over HTTP), show progress, print the answers and stats, shut everything down."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Mapping

DEMO_QUESTION = "In one sentence, what does this document explain?"
DEMO_DOCUMENTS = 3
DEMO_CHARS = 6000  # about 1.5k tokens per document: the demo runs in well under a minute on a laptop CPU


def _title(document: str) -> str:
    return document.strip().splitlines()[0].strip()[:60]


def run_demo(
    model: str = "smollm2-135m",
    *,
    policy: str | None = None,
    n_documents: int = DEMO_DOCUMENTS,
    max_chars: int = DEMO_CHARS,
    question: str = DEMO_QUESTION,
    max_tokens: int = 48,
    config: str = "serve",
    port: int | None = None,
) -> int:
    from entropyinfer.cluster.client import Client
    from entropyinfer.cluster.config import load_serve_file
    from entropyinfer.cluster.launcher import EmbeddedServer, apply_overrides
    from entropyinfer.evaluation.corpus import real_documents

    logging.getLogger("ray").setLevel(logging.WARNING)
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    sf = apply_overrides(load_serve_file(config), model=model, policy=policy)
    documents = [d[:max_chars] for d in real_documents(n_documents)]
    names = [_title(d) for d in documents]
    t0 = time.perf_counter()
    print(f"starting local Ray + Serve with {sf.app.model_name} on CPU/GPU (first run converts the model)...")
    with EmbeddedServer(sf.app, host="127.0.0.1", port=port or 0, log_to_driver=False) as server:
        print(f"serving on {server.url} (ready in {time.perf_counter() - t0:.1f}s)")
        with Client(server.url, api_key=sf.app.auth.resolve()) as client:
            job = client.submit(documents, question, max_tokens=max_tokens, temperature=0.0)
            print(
                f"job {job.id}: {job.documents_total} documents (CPython's pydoc topics), "
                f"{job.prefill_tokens_total} prompt tokens; question: {question}"
            )
            final = client.wait(job.id, poll_s=0.25)
            results = client.results(job.id)
        for r in results:
            print(f"\n[{r.document_index}] {names[r.document_index]}")
            print(f"answer: {(r.text or r.error or '').strip()}")
            print(f"stats:  {_stats(r.stats)}")
        elapsed = (final.finished_at or 0) - (final.created_at or 0)
        print(f"\njob {final.state} in {elapsed:.1f}s; shutting down...")
    print("done: Ray and the server are stopped.")
    return 0 if final.state == "succeeded" else 1


def _stats(stats: Mapping[str, object]) -> str:
    keys = ("policy", "prompt_tokens", "prefill_ms", "density", "decode_ms_per_token", "kv_tokens_kept")
    parts = []
    for k in keys:
        if k in stats:
            v = stats[k]
            parts.append(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(run_demo())
