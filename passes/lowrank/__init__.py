"""Low-rank factorization of weight matrices (the ``lowrank`` pass)."""
