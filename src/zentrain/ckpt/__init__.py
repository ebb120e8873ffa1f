"""Checkpoints: persistent (torch.distributed.checkpoint)."""
