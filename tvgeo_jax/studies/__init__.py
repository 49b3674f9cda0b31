"""Layer 4: the paper's studies, built from the library below: model sources, distances,
merge and interference, representations, one-vs-rest, the reproduction pipeline, its
findings and the report; the evidence they rest on (seed noise floors, permutation tests,
the chance rule) and the prediction of merge damage from geometry."""
