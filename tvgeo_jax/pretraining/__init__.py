"""Layer 3: the embedded base the project pretrains itself (masked-language modelling on
the synthetic corpus, ``embedded``, ``mlm``) and ``load_model``, the one loader for every
model name (``tvgeo_jax.models.names``): built-in, directory or hub id."""
from typing import Optional, Tuple

from tvgeo_jax.models import load_pretrained, names
from tvgeo_jax.models.config import EncoderConfig
from tvgeo_jax.pretraining import embedded


def model_dir(name_or_path: str) -> str:
  """The directory or hub id a name loads from: the embedded base's directory for
  ``tiny``/``embedded`` (built on first use), the name itself otherwise."""
  return embedded.ensure_embedded_base() if names.is_embedded(name_or_path) else name_or_path


def load_model(name_or_path: str, head: str = "classification",
               num_labels: Optional[int] = None, seed: int = 0,
               label_names: Optional[Tuple[str, ...]] = None) -> Tuple[EncoderConfig, dict]:
  """``(config, params)`` of any model name: ``models.load_pretrained`` after resolving the
  embedded base (``model_dir``)."""
  return load_pretrained(model_dir(name_or_path), head=head, num_labels=num_labels, seed=seed,
                         label_names=label_names)


__all__ = ["load_model", "model_dir"]
