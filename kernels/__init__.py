"""Triton kernels, each beside a plain-torch reference (`*_ref.py`) that tests and CPU paths use."""
