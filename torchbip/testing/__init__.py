"""Reusable test helpers: hypothesis strategies and a contract suite for pruning methods."""
