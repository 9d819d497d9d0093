"""Clean-up transforms that never change what the model computes."""
