"""Training objectives besides next-token SFT (train.objective): S-DPO and its reference model."""
