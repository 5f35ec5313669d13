"""Triton kernels of the pack. Only kernels and their thin, input-checking launchers live here."""
