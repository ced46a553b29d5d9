"""Evaluation stage: the label-efficiency benchmark (`mass benchmark`)."""
