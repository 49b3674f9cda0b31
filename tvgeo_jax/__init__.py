"""tvgeo_jax: task-vector geometry, merging and representation analysis of
fine-tuned BERT-family encoders, in JAX/Flax."""
__version__ = "0.1.0"
