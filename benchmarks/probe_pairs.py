r"""Is a pair task's relation readable from a frozen base? (issue 19's pair-task check)

  python -m benchmarks.probe_pairs --model=embedded
  python -m benchmarks.probe_pairs --model=/path/to/hf_dir --tasks=synth_snli,synth_mrpc

Two probes on the base's hidden states, fitted on a task's train split and scored on its
test split, no fine-tuning:

* **relation**: scikit-learn logistic regression on the first token's state of every
  layer (concatenated), and on the mean over tokens of every layer, per pair task: the
  task's main metric (accuracy, F1 for MRPC/QQP) beside its chance level;
* **cross-occurrence**: per content token of the pretraining corpus's held-out pairs,
  does its word occur in the other text? A logistic regression on each layer's token
  states, against the best any probe can do from the token's identity alone (its
  per-token majority): what ``PretrainConfig.pair_match`` trains.

A base on which a pair task fine-tunes within the offline budget should show its relation
here; BUILD_NOTES (issue 19, session 10) records the shipped base's numbers.
"""
from __future__ import annotations

from absl import app, flags

from experiments import cli
from tvgeo_jax import data, pretraining
from tvgeo_jax.data import synthetic
from tvgeo_jax.pretraining import probes
from tvgeo_jax.studies import evidence

FLAGS = flags.FLAGS
PAIR_TASKS = ("synth_qnli", "synth_snli", "synth_mnli", "synth_mrpc", "synth_rte", "synth_qqp")
flags.DEFINE_string("model", "embedded", "Base model: a built-in name or a directory.")
flags.DEFINE_list("tasks", list(PAIR_TASKS), "Synthetic pair tasks to probe.")
flags.DEFINE_float("scale", 5.0, "Data scale of the synthetic tasks (the offline study's).")
flags.DEFINE_integer("max_len", 64, "Tokens per pair (the offline study's max_seq_len).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  unknown = [t for t in FLAGS.tasks if data.get_task(t).name not in synthetic.GENERATORS
             or not data.get_task(t).is_pair]
  if unknown:
    raise app.UsageError(f"--tasks {unknown} are not synthetic pair tasks; choose from "
                         f"{', '.join(PAIR_TASKS)}.")
  config, params = pretraining.load_model(FLAGS.model, head="mlm")
  tokenizer = data.load_tokenizer(pretraining.model_dir(FLAGS.model))
  for task in FLAGS.tasks:
    scores, counts = probes.relation_probe(params, config, tokenizer, task, FLAGS.scale,
                                           FLAGS.max_len)
    main_metric = data.get_task(task).main_metric
    chance = evidence.chance_level(main_metric, counts)
    print(f"{task}: frozen-base {main_metric} " + ", ".join(
        f"{k} {v:.3f}" for k, v in scores.items()) + f" (chance {chance:.3f})", flush=True)
  layers, identity, base_rate = probes.cross_occurrence_probe(params, config)
  print(f"cross-occurrence: per layer {', '.join(f'{x:.3f}' for x in layers)} "
        f"(token identity alone {identity:.3f}, base rate {base_rate:.3f})")


if __name__ == "__main__":
  cli.run(main)
