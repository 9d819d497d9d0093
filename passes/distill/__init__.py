"""Recovery by knowledge distillation from the original model (the ``distill`` pass)."""
