"""Float64 reference CKA for the tests, straight from the HSIC formulas (independent of cka.py)."""
import numpy as np


def hsic_ref(k, l, estimator):
  """HSIC of two raw (uncentred) Gram matrices: biased, or Song et al.'s unbiased."""
  n = k.shape[0]
  if estimator == "biased":
    h = np.eye(n) - np.ones((n, n)) / n
    return np.trace(k @ h @ l @ h) / (n - 1) ** 2
  k, l = k.copy(), l.copy()
  np.fill_diagonal(k, 0.0)
  np.fill_diagonal(l, 0.0)
  one = np.ones(n)
  return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
          - 2.0 / (n - 2) * (one @ k @ l @ one)) / (n * (n - 3))


def cka_ref(x, y, estimator="unbiased"):
  """Linear CKA of feature matrices [n, d]; NaN for constant features, as cka.py."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  k, l = x @ x.T, y @ y.T
  with np.errstate(invalid="ignore"):
    return hsic_ref(k, l, estimator) / np.sqrt(
        hsic_ref(k, k, estimator) * hsic_ref(l, l, estimator))
