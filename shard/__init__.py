"""Executing a model on one device: model definitions, weights, KV cache, prefill and decode."""
