"""Layer 3: the embedded base the project pretrains itself (masked-language modelling on
the synthetic corpus) and the resolution of the built-in model names that need it."""
