"""Typed configuration: dataclasses (`schema.py`), YAML loading (`loader.py`), presets (`*.yaml`)."""
