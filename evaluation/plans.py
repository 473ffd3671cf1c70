"""What a quality run runs and what it records: policy configurations, plans, the record of one case.

A `QualityPlan` is a grid: prompt lengths x policy configurations (`PolicySpec`) x tasks (names in
`evaluation.tasks.TASKS`) x needle depths; `main` configurations run at every length, `sweep` ones only at
`sweep_lengths`. `FULL_PLAN` is the recorded run (`benchmarks/results/quality.md`), `QUICK_PLAN` a smoke
run. Every case of a plan gives one `CaseRecord` (`evaluation.runner.run_case`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypedDict

from entropyinfer.evaluation.metrics import HaystackMetrics
from entropyinfer.policies.config import SparsePrefillConfig

__all__ = [
    "DENSE",
    "FULL_PLAN",
    "QUICK_PLAN",
    "CaseRecord",
    "ConfigFields",
    "PolicySpec",
    "QualityPlan",
    "entropy_spec",
    "fixed_spec",
]


class ConfigFields(TypedDict):
    """A configuration as the results name it: its name, policy, budget (B0 or the fixed budget), mode."""

    config: str
    policy: str
    budget: int | None
    mode: str | None


class _CaseFields(ConfigFields):
    task: str
    length: int  # the asked prompt length
    tokens: int  # the prompt's actual length
    depth: float
    depth_actual: float
    prompt_sha: str  # resuming reuses a record only while its prompt is unchanged
    expected: str
    answer: str
    correct: bool
    density: float | None
    rigid_fraction: float | None
    budget_mean: float | None
    prefill_s: float
    decode_s: float
    generated_tokens: int


class CaseRecord(_CaseFields, HaystackMetrics):
    """One answered case (JSON-ready): the configuration, the case, the answer and its score, the prefill's
    statistics; the passkey case at the plan's `logits_depth` also carries the `HaystackMetrics`."""


@dataclass(frozen=True)
class PolicySpec:
    """A policy configuration of the matrix: `policy` with sparse-config `overrides` on the plan's preset."""

    name: str
    policy: str  # "dense" | "entropy" | "fixed"
    # (SparsePrefillConfig field, value): the value's type depends on the field; the config checks it.
    overrides: tuple[tuple[str, Any], ...] = ()

    def config(self, base: SparsePrefillConfig) -> SparsePrefillConfig:
        return dataclasses.replace(base, **dict(self.overrides))

    def describe(self, base: SparsePrefillConfig) -> ConfigFields:
        cfg = self.config(base)
        if self.policy == "dense":
            return {"config": self.name, "policy": "dense", "budget": None, "mode": None}
        budget = cfg.base_budget if self.policy == "entropy" else cfg.fixed_budget
        mode = cfg.mode if self.policy == "entropy" else None
        return {"config": self.name, "policy": self.policy, "budget": budget, "mode": mode}


def entropy_spec(b0: int, mode: str = "per_head") -> PolicySpec:
    """The entropy policy at base budget `b0` ("entropy B0=256", plus the mode unless per_head)."""
    suffix = "" if mode == "per_head" else f" {mode}"
    return PolicySpec(f"entropy B0={b0}{suffix}", "entropy", (("base_budget", b0), ("mode", mode)))


def fixed_spec(budget: int) -> PolicySpec:
    """The fixed-budget baseline at `budget` tokens per (KV head, segment) ("fixed 256")."""
    return PolicySpec(f"fixed {budget}", "fixed", (("fixed_budget", budget),))


DENSE = PolicySpec("dense", "dense")


@dataclass(frozen=True)
class QualityPlan:
    """What `run_matrix` runs. `main` configurations run at every length, `sweep` ones at `sweep_lengths`.

    At every length the passkey case at `logits_depth` also returns the logits of every position: perplexity
    of its haystack (real text) and KL(dense || sparse) over the haystack's last `kl_window` positions. The
    target (`evaluation.report.target_verdict`): an entropy configuration within `target_points` of dense
    accuracy at a density of at most `target_density`, at `target_length`."""

    name: str
    preset: str
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    main: tuple[PolicySpec, ...]
    sweep: tuple[PolicySpec, ...]
    sweep_lengths: tuple[int, ...]
    logits_depth: float = 0.5
    kl_window: int = 1024
    max_tokens: int = 16
    target_length: int = 8176
    target_density: float = 0.30
    target_points: float = 2.0

    def specs_at(self, length: int) -> list[PolicySpec]:
        """The configurations run at `length`, dense first (KL needs its log-probabilities)."""
        specs = list(self.main) + (
            [s for s in self.sweep if s not in self.main] if length in self.sweep_lengths else []
        )
        return sorted(specs, key=lambda s: s.policy != "dense")

    def cases_at(self, length: int) -> int:
        """How many records the plan makes at `length`."""
        return len(self.specs_at(length)) * len(self.tasks) * len(self.depths)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON (configurations by name)."""
        d = dataclasses.asdict(self)
        d["main"] = [s.name for s in self.main]
        d["sweep"] = [s.name for s in self.sweep]
        return d


FULL_PLAN = QualityPlan(
    name="full",
    preset="entropy_short",
    tasks=("passkey",),
    # Longest first (the target is at 8k). 8176 + up to 16 generated tokens = SmolLM2's 8192. Fixed budgets
    # of about the entropy configurations' densities: fixed 256 ~ entropy B0=128, fixed 512 ~ B0=256 at 8k.
    # About 55 minutes on the shared 2-core machine (one torch thread).
    lengths=(8176, 6144, 4096, 2048),
    depths=(0.1, 0.3, 0.5, 0.7, 0.9),
    main=(DENSE, entropy_spec(128), entropy_spec(256), fixed_spec(256), fixed_spec(512)),
    sweep=(entropy_spec(384), entropy_spec(512), entropy_spec(256, "reference"), fixed_spec(128)),
    sweep_lengths=(8176,),
)

QUICK_PLAN = QualityPlan(
    name="quick",
    preset="entropy_short",
    tasks=("passkey",),
    lengths=(2048, 1024),
    depths=(0.5,),
    main=(DENSE, entropy_spec(256), fixed_spec(256)),
    sweep=(entropy_spec(128),),
    sweep_lengths=(2048,),
    kl_window=512,
    target_length=2048,
)
