"""Benchmarks that run whole components (guard, detector) on the offline benchmark."""
