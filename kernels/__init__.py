"""Triton kernels, each beside a plain-torch reference (`*_ref.py`) that tests and CPU paths use.

`backend` decides which of the two runs (and whether Triton is compiled or interpreted), `tiling` holds every
kernel's launch shapes, `block_layout` the segment / block layout and result types of the block-sparse ops.
"""
