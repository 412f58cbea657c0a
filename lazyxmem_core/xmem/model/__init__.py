"""XMem's networks as plain nn.Modules whose parameter names match the official checkpoints."""
from .network import XMemNet

__all__ = ["XMemNet"]
