"""Command-line experiments (``python -m experiments.<name>``), thin over tvgeo_jax."""
