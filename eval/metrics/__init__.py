"""Evaluation metrics, each a small tested function returning a typed result."""
