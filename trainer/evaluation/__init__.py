"""Evaluation: LLaRA's generation protocol, candidate scoring and CTR (evaluate, scoring), at the end of
training and for launch/eval.py."""
