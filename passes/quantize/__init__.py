"""Weight quantization: formats, RTN/GPTQ/AWQ, mixed-precision assignment, the pass."""
