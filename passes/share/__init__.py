"""Sharing tensors across layers (the ``share`` pass)."""
