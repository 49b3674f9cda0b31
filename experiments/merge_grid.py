r"""The merge/interference study on saved finetune runs (paper A Table 3, paper C).

  python -m experiments.merge_grid --runs='runs/synth_*/lora' --method=lora_avg --out=out/merge
  python -m experiments.merge_grid --runs=R1,R2,R3 --method=ties --k=0.2 --lam=1.0 \
      --analyses=pairs,ties,topk,multitask --out=out/ties
  python -m experiments.merge_grid --runs='runs/*_lora' --method=knots --inner=ties \
      --analyses=pairs,multitask --multitask_methods=all --out=out/knots

Every ordered pair (i, j) is merged with task i's head and scored on task i's test
split; δ, distances and Spearman tables (Table 3) go to OUT as JSON and Markdown,
with scatter plots. Evaluations are cached in OUT/cache: a rerun skips them.
See ``tvgeo_jax.studies.merge_study`` for the files written.
"""
from __future__ import annotations

from absl import flags

from experiments import cli, model_inputs

from tvgeo_jax.studies import merge_study

FLAGS = flags.FLAGS
flags.adopt_module_key_flags(model_inputs)  # --runs and friends in --helpshort
flags.DEFINE_enum("method", "lora_avg", list(merge_study.ALIASES) + list(merge_study.METHODS),
                  "Pair merge: lora_avg (factor averaging, paper A), lora_product, lora_svd "
                  "(peft svd), weight_avg, task_arithmetic, ties, dare, dare_ties, "
                  "magnitude_prune, breadcrumbs, della, tsv_merge, iso_c, knots.")
flags.DEFINE_float("lam", None, "λ of the task-vector merges (library default 1.0).")
flags.DEFINE_float("k", None, "Kept fraction in (0, 1] of ties, magnitude_prune, "
                   "breadcrumbs, della (mean keep probability), knots' TIES (default 0.2).")
flags.DEFINE_enum("granularity", None, ["global", "per_tensor"],
                  "Top-k granularity of ties / magnitude_prune.")
flags.DEFINE_float("drop_rate", None, "dare / dare_ties drop probability (study default 0.5).")
flags.DEFINE_integer("refactor_rank", None, "lora_product / lora_svd: re-factorise to this "
                     "rank by SVD (lora_svd default: the adapters' rank).")
flags.DEFINE_float("gamma", None, "breadcrumbs: fraction of largest magnitudes dropped "
                   "(default 0.01).")
flags.DEFINE_float("epsilon", None, "della: keep probabilities span k ± epsilon (default 0.1).")
flags.DEFINE_enum("sign_rule", None, ["mass", "frequency"], "Sign election of ties, "
                  "dare_ties, della, knots.")
flags.DEFINE_enum("zero_sign", None, ["majority", "positive"], "Elected sign 0 becomes the "
                  "majority sign or +1 (ties, dare_ties, della).")
flags.DEFINE_enum("space", None, ["product", "factors"], "dare, dare_ties, magnitude_prune, "
                  "breadcrumbs, della: act on ΔW (product) or on the LoRA factors (peft's "
                  "non-svd combination types).")
flags.DEFINE_enum("inner", None, ["ties", "dare_ties", "task_arithmetic"],
                  "knots: the merge applied in the aligned basis (default ties).")
flags.DEFINE_integer("merge_seed", None, "Seed of the random drops (dare, dare_ties, della).")
flags.DEFINE_list("analyses", ["pairs"], f"Any of {', '.join(merge_study.ANALYSES)}.")
flags.DEFINE_string("score", "main", "Score: main (the task's main metric), a metric name, "
                    "or neg_loss.")
flags.DEFINE_list("modules", ["query", "value"], "Modules of the distance tables.")
flags.DEFINE_list("kplus", ["5"], "k+ columns of the main table (all k are in the JSON).")
flags.DEFINE_list("topk", ["0.05", "0.1", "0.2", "0.5", "1.0"], "Top-k sweep fractions.")
flags.DEFINE_list("multitask_methods", None, "Methods of the multi-task merges (default: "
                  "the LoRA averagings, weight_avg, task_arithmetic, ties; 'all': every "
                  "method that applies).")
flags.DEFINE_integer("top_k", None, "Dense Grassmann: top-k singular subspaces (full FT).")
flags.DEFINE_integer("chunk_size", 16, "Merged models per stacked forward.")
flags.DEFINE_integer("max_examples", None, "Score every model (single and merged) on the "
                     "first this many examples of each test split (whole eval batches); "
                     "default: the whole split.")
flags.DEFINE_integer("seed", 0, "Seed of subset choices.")
flags.DEFINE_string("out", "out/merge", "Output directory.")
flags.DEFINE_bool("figures", True, "Draw the figures.")


def main(argv):
  del argv
  method = merge_study.resolve_method(FLAGS.method)
  kw = {"lam": FLAGS.lam, "k": FLAGS.k, "granularity": FLAGS.granularity,
        "drop_rate": FLAGS.drop_rate, "refactor_rank": FLAGS.refactor_rank,
        "gamma": FLAGS.gamma, "epsilon": FLAGS.epsilon, "sign_rule": FLAGS.sign_rule,
        "zero_sign": FLAGS.zero_sign, "space": FLAGS.space, "inner": FLAGS.inner,
        "merge_seed": FLAGS.merge_seed}
  kw = {k: v for k, v in kw.items() if v is not None}
  srcs = model_inputs.load_models()
  res = merge_study.run_study(
      srcs, FLAGS.out, method, analyses=FLAGS.analyses, score=FLAGS.score,
      modules=FLAGS.modules, kplus=[int(k) for k in FLAGS.kplus],
      topk_ks=[float(k) for k in FLAGS.topk], multitask_methods=FLAGS.multitask_methods,
      seed=FLAGS.seed, top_k=FLAGS.top_k, chunk_size=FLAGS.chunk_size,
      figures=FLAGS.figures, max_examples=FLAGS.max_examples, **kw)
  print(f"{len(srcs)} runs, {res['evaluations']} new evaluations -> {FLAGS.out}")
  for m, grid in res.get("pairs", {}).items():
    print(f"\n{m}:\n" + merge_study.table3_markdown(grid["spearman"],
                                                    [int(k) for k in FLAGS.kplus]))


if __name__ == "__main__":
  cli.run(main)
