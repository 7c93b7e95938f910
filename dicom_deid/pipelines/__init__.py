"""Pipelines: assemble transforms into runnable pipelines (build + run)."""
