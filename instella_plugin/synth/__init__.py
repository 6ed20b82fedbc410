"""Synthetic training data built on generation: the GSM8K-synthetic pipeline (programs abstracted from
seed problems, run in a sandbox, re-instantiated, answers checked, decontaminated)."""
