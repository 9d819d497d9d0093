"""Model loaders: turn the MODEL argument into something ``torch.export`` can capture."""
