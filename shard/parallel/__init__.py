"""Tensor parallelism: the rank's process-group handle (`group.py`), how heads split across ranks
(`heads.py`), and the column-, row- and vocab-parallel layers with per-parameter slice loaders
(`linear.py`). The model (`shard/model.py`) builds its layers from these; with no group (`None`) every
layer is the plain single-device one."""
