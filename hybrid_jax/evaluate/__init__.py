"""Evaluation with lm-evaluation-harness: the `hybrid_jax` harness model and `python -m hybrid_jax.evaluate`.

Importing `hybrid_jax.evaluate.harness` registers the model with the harness (it needs the `eval` extra);
this package itself imports nothing heavy.
"""
