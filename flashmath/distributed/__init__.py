"""flashmath.distributed: split-KV decoding and ring attention over torch.distributed."""
