"""Benchmark scoring, to the official definitions (VQA accuracy and its normalisation first)."""
