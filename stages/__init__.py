"""Thin DVC stages: parse params, call the pure functions in pipeline/ and model/."""
