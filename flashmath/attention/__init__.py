"""flashmath.attention: masks, the reference oracle and the tiled NumPy kernels."""
