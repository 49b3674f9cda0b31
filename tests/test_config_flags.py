"""Flags generated from TrainConfig's fields; presets as data that name their parent."""
import dataclasses

from absl import flags
from absl.testing import absltest

from experiments import config_flags
from tvgeo_jax.training import presets
from tvgeo_jax.training.config import TrainConfig


class ConfigFlagsTest(absltest.TestCase):

  def _flags(self, argv):
    fv = flags.FlagValues()
    config_flags.define_train_flags(fv)
    fv(["prog"] + argv)
    return fv

  def test_one_flag_per_field_typed_and_unset_by_default(self):
    fv = self._flags([])
    names = {f.name for f in dataclasses.fields(TrainConfig)} - set(config_flags.SPECIAL)
    self.assertEqual({n for n in names if n in fv}, names)
    self.assertTrue(all(v is None for v in config_flags.train_overrides(fv).values()))
    fv = self._flags(["--learning_rate=3e-4", "--lora_targets=query,key", "--progress=false",
                      "--dtype=bfloat16", "--dropout=0.2", "--epochs=7"])
    got = config_flags.train_overrides(fv)
    self.assertEqual((got["learning_rate"], got["lora_targets"], got["progress"], got["dtype"],
                      got["dropout"], got["epochs"]),
                     (3e-4, ["query", "key"], False, "bfloat16", 0.2, 7))
    with self.assertRaises(flags.IllegalFlagValueError):
      self._flags(["--dtype=float16"])
    config = presets.resolve("synth_sst2", "lora", "tiny", None, got)
    self.assertEqual((config.learning_rate, config.lora_targets, config.epochs),
                     (3e-4, ("query", "key"), 7))

  def test_presets_inherit_from_their_parents(self):
    self.assertEqual([p.name for p in presets.lineage("offline")], ["paper", "tiny", "offline"])
    root = TrainConfig()
    paper = presets.resolve("qnli", "full", "roberta-base")
    self.assertEqual((paper.learning_rate, paper.batch_size, paper.epochs, paper.max_seq_len),
                     (2e-5, root.batch_size, root.epochs, root.max_seq_len))
    tiny = presets.resolve("synth_sst2", "lora", "tiny")
    self.assertEqual((tiny.learning_rate, tiny.epochs, tiny.patience, tiny.batch_size,
                      tiny.max_seq_len, tiny.weight_decay),
                     (3e-3, 40, 10, 32, 64, root.weight_decay))
    # A child's all-method value overrides its parent's per-method one; per-method values
    # it does not set (the learning rates) are inherited.
    offline = {m: presets.resolve("synth_qnli", m, "embedded", "offline") for m in
               ("full", "lora", "bottleneck")}
    self.assertEqual({m: (c.epochs, c.patience, c.data_scale, c.learning_rate, c.progress)
                      for m, c in offline.items()},
                     {"full": (2, 1, 5.0, 1e-3, False), "lora": (2, 1, 5.0, 3e-3, False),
                      "bottleneck": (2, 1, 5.0, 3e-3, False)})
    # Per-task values come last: SST-2 has room to spare (data scale 2), RTE by LoRA
    # needs more training pairs than by full fine-tuning.
    self.assertEqual(presets.resolve("synth_sst2", "lora", "embedded", "offline").data_scale,
                     2.0)
    self.assertEqual([presets.resolve("synth_rte", m, "embedded", "offline").train_scale
                      for m in ("full", "lora", "bottleneck")], [3.0, 6.0, 1.0])
    with self.assertRaisesRegex(ValueError, "Unknown preset 'nope'; valid presets: paper"):
      presets.resolve("synth_sst2", "lora", "tiny", "nope")


if __name__ == "__main__":
  absltest.main()
