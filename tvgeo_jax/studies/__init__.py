"""The studies built on measured geometry and merges: evidence (noise floors, permutation
tests, the chance rule) and the prediction of merge damage."""
