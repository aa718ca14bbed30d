"""MSDN++ heads: the two mutual attention sub-nets, their losses and the causal intervention."""
from heads.config import HeadConfig
from heads.msdn import MSDN, HeadOutput

__all__ = ["HeadConfig", "MSDN", "HeadOutput"]
