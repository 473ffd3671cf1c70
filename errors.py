"""Typed errors raised across entropyinfer. Each message says what to do next."""

from __future__ import annotations


class EntropyInferError(Exception):
    """Base class of every error entropyinfer raises on purpose."""


class ConfigError(EntropyInferError, ValueError):
    """A configuration file or override is invalid (unknown key, wrong type, bad value)."""


class UnknownPolicyError(ConfigError):
    """The attention policy name is not one entropyinfer knows."""


class CheckpointNotFoundError(EntropyInferError, FileNotFoundError):
    """The model name is neither an embedded model nor a checkpoint folder."""


class UnsupportedArchitectureError(EntropyInferError, ValueError):
    """The checkpoint's architecture (config.json) is not one entropyinfer can run."""


class PromptTooLongError(EntropyInferError, ValueError):
    """A prompt (plus the tokens to generate) does not fit the model's context."""


class InvalidRequestError(EntropyInferError, ValueError):
    """A request argument is out of range or of the wrong type; `field` names it."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class RequestCancelled(EntropyInferError):
    """The request was cancelled (its cancel event was set) before it finished."""


class ShardGroupError(EntropyInferError, RuntimeError):
    """A rank of the tensor-parallel group died or stopped answering: the group cannot run requests any
    more (start a new one; the Serve shard actor rebuilds its group itself)."""
