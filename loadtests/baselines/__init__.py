"""Baselines the relay is measured against, driven by the same load generator."""
