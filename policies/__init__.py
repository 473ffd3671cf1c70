"""Pure attention decisions: entropy profiling, budgets, KV compression selection, baselines."""
