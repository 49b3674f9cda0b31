"""The encoder, its configuration and Hugging Face checkpoint I/O."""
from tvgeo_jax.models.config import EncoderConfig, tiny_config
from tvgeo_jax.models.encoder import Encoder, HEADS
from tvgeo_jax.models.hf_io import (init_params, load_pretrained, save_pretrained,
                                    params_from_state_dict, state_dict_from_params)
from tvgeo_jax.models.apply import apply, make_apply

__all__ = ["EncoderConfig", "tiny_config", "Encoder", "HEADS", "init_params",
           "load_pretrained", "save_pretrained", "params_from_state_dict",
           "state_dict_from_params", "apply", "make_apply"]
