"""MSDN++ heads: the two mutual attention sub-nets, their losses and the causal intervention."""
