"""Text generation for causal LMs: one library with ``prefill`` and ``decode`` entry points.

See ``docs/generation.md`` for the design (a preallocated max-length KV cache owned by the
runtime; the compiled functions return only the new K/V rows, which the runtime writes in).
"""
