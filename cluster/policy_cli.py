"""`entropyinfer policy show` and `entropyinfer policy plot` (added to the root CLI by `cli.py`).

entropyinfer policy show [--url U] [--api-key K]              # GET /v1/policy/heads, as JSON
entropyinfer policy plot --out heads.png [--url U]            # GET /v1/policy/heads.png
entropyinfer policy plot --out heads.png --profile FILE       # a saved profile, no server
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

__all__ = ["add_policy_parser", "profile_snapshot"]


def add_policy_parser(subparsers: Subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("policy", help="the policy actor's head statistics and budget table")
    sub = p.add_subparsers(dest="policy_command", required=True)
    for name, help_text in (("show", "print GET /v1/policy/heads"), ("plot", "save the heat map PNG")):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--url", default=os.environ.get("ENTROPYINFER_URL", "http://127.0.0.1:8000"))
        c.add_argument("--api-key", default=os.environ.get("ENTROPYINFER_API_KEY"))
        if name == "plot":
            c.add_argument("--out", "-o", type=Path, required=True, help="PNG file to write")
            c.add_argument("--profile", type=Path, default=None, help="plot a saved profile (no server)")
        c.set_defaults(func=cmd_policy)
    return p


def profile_snapshot(path: Path) -> dict[str, Any]:
    """A saved profile file as the actor's snapshot (what `profile_heatmap` draws)."""
    from entropyinfer.policies.head_budgets import PROFILE_FORMAT, HeadBudgetTable
    from entropyinfer.policies.head_stats import HeadProfile

    body = json.loads(path.read_text())
    if body.get("format") != PROFILE_FORMAT:
        raise ValueError(f"{path}: not an entropyinfer head profile")
    profile = HeadProfile.from_dict(body["profile"])
    table = (
        body.get("table")
        or HeadBudgetTable.identity(profile.model, profile.num_layers, profile.num_kv_heads).to_dict()
    )
    return {"model": profile.model, "table": table, "statistics": profile.summary()}


def cmd_policy(args: argparse.Namespace) -> int:
    import httpx

    from entropyinfer.policies.head_heatmap import profile_heatmap

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    if args.policy_command == "plot" and args.profile is not None:
        profile_heatmap(profile_snapshot(args.profile), args.out)
        print(f"wrote {args.out}")
        return 0
    path = "/v1/policy/heads" + (".png" if args.policy_command == "plot" else "")
    r = httpx.get(args.url.rstrip("/") + path, headers=headers, timeout=30)
    if r.status_code != 200:
        print(f"error: {r.status_code} {r.text}", file=sys.stderr)
        return 1
    if args.policy_command == "show":
        print(json.dumps(r.json(), indent=1))
        return 0
    args.out.write_bytes(r.content)
    version, panels = r.headers.get("x-table-version", "?"), r.headers.get("x-panels")
    print(f"wrote {args.out} (table v{version}, panels {panels})")
    return 0
