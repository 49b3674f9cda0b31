"""Representation analysis (paper B): layer-wise linear CKA, UMAP projections, clusters.

Modules: ``tvgeo_jax.analysis.cka`` and ``tvgeo_jax.analysis.similarity`` (SVCCA, PWCCA,
orthogonal Procrustes; JAX only) and ``tvgeo_jax.analysis.umap_analysis``
(umap-learn, scikit-learn and matplotlib, imported lazily inside its functions).
Nothing is re-exported here, so ``from tvgeo_jax.analysis import cka`` is the module.
"""
