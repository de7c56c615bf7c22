"""flashmath.lab: the experiments behind `flashmath lab` and the runner that writes them up."""
