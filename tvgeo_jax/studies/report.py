"""The reproduction report: report.md and a self-contained report.html (figures inlined).

The report is built as a list of blocks (heading, paragraph, table, image, markdown)
rendered twice, so the two files always say the same thing. The report computes no
finding: it renders what each study wrote in its summary.json (``scores``,
``distances/<method>``, ``merge``, ``prediction``, ``representations``, ``one_vs_rest``):
the claim, the measurement, the permutation tests and the verdict.
"""
from __future__ import annotations

import base64
import datetime
import glob
import html
import os
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np

from tvgeo_jax.core import io_utils
from tvgeo_jax.studies import evidence, merge_prediction, scores

Block = tuple  # ("h", level, text) | ("p", text) | ("table", header, rows) | ("img", path, caption) | ("md", text)


# --- rendering ----------------------------------------------------------------------

def to_markdown(blocks: Sequence[Block], root: str) -> str:
  out = []
  for b in blocks:
    if b[0] == "h":
      out.append("#" * b[1] + " " + b[2])
    elif b[0] == "p":
      out.append(b[1])
    elif b[0] == "table":
      header, rows = b[1], b[2]
      out.append("| " + " | ".join(header) + " |")
      out.append("|" + "|".join("---" for _ in header) + "|")
      out.extend("| " + " | ".join(str(c) for c in r) + " |" for r in rows)
    elif b[0] == "img":
      out.append(f"![{b[2]}]({os.path.relpath(b[1], root)})")
    elif b[0] == "md":
      out.append(b[1])
    out.append("")
  return "\n".join(out)


def _inline(path: str) -> str:
  with open(path, "rb") as f:
    return "data:image/png;base64," + base64.b64encode(f.read()).decode()


def _md_table_to_html(text: str) -> str:
  """Markdown from the study modules: pipe tables become tables, other lines paragraphs."""
  out, table = [], []

  def flush():
    if table:
      rows = [r.strip().strip("|").split("|") for r in table if not set(r) <= set("|-: ")]
      head, body = rows[0], rows[1:]
      out.append("<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head)
                 + "</tr>" + "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>"
                                                        for c in r) + "</tr>" for r in body)
                 + "</table>")
      table.clear()

  for line in text.splitlines():
    if line.strip().startswith("|"):
      table.append(line)
      continue
    flush()
    if line.strip().startswith("#"):
      level = len(line) - len(line.lstrip("#"))
      out.append(f"<h{min(level + 2, 6)}>{html.escape(line.lstrip('#').strip())}</h{min(level + 2, 6)}>")
    elif line.strip():
      out.append(f"<p>{html.escape(line)}</p>")
  flush()
  return "\n".join(out)


def to_html(blocks: Sequence[Block], title: str) -> str:
  body = []
  for b in blocks:
    if b[0] == "h":
      body.append(f"<h{b[1]}>{html.escape(b[2])}</h{b[1]}>")
    elif b[0] == "p":
      body.append(f"<p>{html.escape(b[1])}</p>")
    elif b[0] == "table":
      head = "".join(f"<th>{html.escape(str(c))}</th>" for c in b[1])
      rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                     for r in b[2])
      body.append(f"<table><tr>{head}</tr>{rows}</table>")
    elif b[0] == "img":
      body.append(f'<figure><img src="{_inline(b[1])}" alt="{html.escape(b[2])}">'
                  f"<figcaption>{html.escape(b[2])}</figcaption></figure>")
    elif b[0] == "md":
      body.append(_md_table_to_html(b[1]))
  style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.45}"
           "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;"
           "padding:3px 8px;text-align:right}th{background:#eee}img{max-width:100%}"
           "figcaption{font-size:90%;color:#555}")
  return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
          f"</title><style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# --- content ------------------------------------------------------------------------

def _fmt(x: Any, digits: int = 3) -> str:
  if x is None or (isinstance(x, float) and np.isnan(x)):
    return "–"
  if isinstance(x, (float, np.floating)):
    return f"{x:.{digits}f}"
  return str(x)


def _pct(x: Any) -> str:
  return "–" if x is None else f"{100 * float(x):.2f}"


def judging_blocks() -> List[Block]:
  """How every finding below is judged (the same rule for all)."""
  return [("h", 2, "How the findings are judged"),
          ("p", "Each finding is computed by the study that owns it and written in its "
                "summary.json; this report only renders them. Beside each finding: its "
                "permutation tests (scipy.stats.permutation_test; statistic, p-value, number "
                f"of permutations), judged at level {evidence.DEFAULT_LEVEL:g}: the verdict "
                "comes from the p-value only. Note: " + evidence.POWER_NOTE + "."),
          ("p", "No verdict on noise: a finding resting on a model near chance is \"not "
                "evaluated\" (the models are listed). Rule: " + evidence.chance_rule() + "."),
          ("p", "Seed floor (with --seeds ≥ 2): the same-task, different-seed distance "
                "(maximum over seed pairs) per module, metric and layer; a grouping counts "
                "only where the mean between-family distance exceeds it.")]


def finding_blocks(found: Sequence[Mapping[str, Any]]) -> List[Block]:
  """Findings of a study's summary: one numbered paragraph each (claim, measurement,
  verdict; the near-chance models by name), then their tests as one table (a test of a
  finding that is not evaluated keeps its p-value, and its verdict says so)."""
  blocks: List[Block] = []
  rows = []
  for n, f in enumerate(found, 1):
    blocks.append(("p", f"Finding {n} {f['claim']}: {f['measured']}. Verdict: "
                        f"{f['verdict']}."))
    for t in f.get("tests", []):
      verdict = (t["verdict"] if f.get("evaluated", True)
                 else f"not evaluated (near chance; the test alone: {t['verdict']})")
      rows.append([n, t["name"], _fmt(t["statistic"]), f"{t['p_value']:.3g}",
                   t["n_permutations"], t["alternative"], f"{t['level']:g}", verdict])
  if rows:
    blocks.append(("table", ["finding", "test", "statistic", "p", "permutations",
                             "alternative", "level", "verdict"], rows))
  return blocks


def scores_section(pipe) -> List[Block]:
  p = pipe.preset
  summary = scores.read_summary(os.path.join(pipe.out, "scores"))
  blocks: List[Block] = [("h", 2, "Table 2 — test scores per task and method")]
  if summary is None:
    return blocks + [("p", "Scores not computed yet (the scores step).")]
  models = summary["models"]
  bow = summary.get("bag_of_words", {})
  real = any(not t.startswith("synth_") for t in p.tasks)
  header = ["task"] + list(p.methods)
  if p.seeds > 1:
    header += [f"{m} seeds (min–max)" for m in p.methods]
  header += ["chance"]
  if real:
    header += [f"paper A {m}" for m in p.methods if m in scores.PAPER_A_TABLE2]
  if bow:
    header += ["bag of words"]
  rows, near = [], set(summary.get("near_chance", []))
  for task in p.tasks:
    row = [task]
    for m in p.methods:
      r = models.get(scores.model_key(task, m))
      cell = "–" if r is None or r["main"] is None else f"{100 * r['main']:.2f}"
      row.append(cell)
    if p.seeds > 1:
      for m in p.methods:
        v = [models[k]["main"] for k in pipe.model_keys(m, [task])
             if k in models and models[k]["main"] is not None]
        row.append(f"{100 * min(v):.2f}–{100 * max(v):.2f}" if len(v) > 1 else "–")
    first = next((models[k] for k in pipe.model_keys(p.methods[0], [task], False)
                  if k in models), None)
    row.append(_pct(first["chance"]) if first else "–")
    if real:
      row += [_fmt(scores.PAPER_A_TABLE2[m].get(task), 2) for m in p.methods
              if m in scores.PAPER_A_TABLE2]
    if bow:
      row.append(_pct(bow.get(task)))
    rows.append(row)
  blocks += [
      ("p", f"Base model: {p.model}. Main metric of each task (×100): MCC for CoLA, F1 for "
            "MRPC/QQP, Pearson for STS-B, accuracy otherwise (first seed; chance: the best "
            "constant predictor on the test split). Paper A (roberta-base, Table 2) beside "
            "real tasks; beside synthetic tasks the bag-of-words baseline (a logistic "
            "regression on word counts: a model that does not beat it has learnt a word "
            "list, not the task)."),
      ("table", header, rows),
      ("p", "Near chance (rule: " + summary["chance_rule"] + "): "
            + (", ".join(sorted(near)) if near else "none") + ".")]
  blocks += finding_blocks(summary.get("findings", []))
  return blocks


def _load_npz(path: str):
  return np.load(path, allow_pickle=False) if os.path.exists(path) else None


def distances_section(pipe) -> List[Block]:
  blocks: List[Block] = [("h", 2, "Figures 2 and 3 — geometry of task vectors")]
  for method in pipe.preset.methods:
    root = os.path.join(pipe.out, "distances", method)
    path = os.path.join(root, "summary.json")
    if not os.path.exists(path):
      blocks.append(("p", f"{method}: distances not computed."))
      continue
    s = io_utils.read_json(path)
    title = "full fine-tuning, ΔW (Figure 2)" if method == "full" else "LoRA, BA (Figure 3)"
    blocks.append(("h", 3, title))
    rows = []
    for r in s["grouping"]:
      t = r.get("test")
      row = [r["module"], r["metric"], _fmt(r["share"], 2), _fmt(r["chance"], 2),
             "–" if t is None else f"{t['p_value']:.3g} ({t['n_permutations']})",
             ", ".join(r["per_group"])]
      if s.get("seeds"):
        f = r.get("seed_floor")
        row.append("–" if f is None else f"{f['floor']:.3g} / {f['between_family_mean']:.3g}"
                   f" — {'clears' if f['clears'] else 'does not clear'}")
      rows.append(row)
    header = ["module", "metric", "share of tasks whose nearest neighbour is in their paper "
              "group", "chance", "p (permutations)", "per group"]
    if s.get("seeds"):
      header.append("seed floor / between-family mean")
    blocks.append(("table", header, rows))
    if s.get("learnt_tasks"):
      blocks.append(("p", "Some models are near chance, so each grouping finding is also "
                          "judged on the tasks whose models learnt: "
                          + ", ".join(s["learnt_tasks"]) + "."))
    blocks += finding_blocks(s.get("findings", [])[:-1] if s.get("figure4")
                             else s.get("findings", []))
    if s.get("seed_floor"):
      frows = []
      for key, v in s["seed_floor"].items():
        frows.append([key, " ".join(_fmt(x, 3) for x in np.atleast_1d(v["floor"])),
                      " ".join(_fmt(x, 3) for x in np.atleast_1d(v["same_task_mean"])),
                      " ".join(_fmt(x, 3) for x in np.atleast_1d(v["between_task_mean"]))])
      blocks += [("p", "Seed noise floor per layer (same-task, different-seed distances "
                       "beside between-task distances):"),
                 ("table", ["module/factor/metric", "floor (max) per layer",
                            "same-task mean per layer", "between-task mean per layer"],
                  frows)]
    for fig in sorted(glob.glob(os.path.join(root, "figures", "pca_product_*.png"))):
      if "plus" in fig and "cosine" not in fig:
        continue
      what = "ΔW" if method == "full" else "BA"
      blocks.append(("img", fig, f"{method}: PCA of the rows of T̄ ({what}), "
                                 f"{os.path.basename(fig)[len('pca_product_'):-4]}"))
    if s.get("figure4"):
      blocks += figure4_blocks(s, root)
  return blocks


def figure4_blocks(s, root) -> List[Block]:
  blocks: List[Block] = [("h", 3, "Figure 4 — clustering on A alone and B alone")]
  rows = [[r["module"], _fmt(r["rho_B_vs_BA"]), _fmt(r["rho_A_vs_BA"]),
           "yes" if r["B_resembles_BA_more"] else "no"] for r in s["figure4"]]
  blocks.append(("table", ["module", "ρ(cos B, cos BA)", "ρ(cos A, cos BA)",
                           "B closer to BA than A"], rows))
  blocks += finding_blocks(s["findings"][-1:])
  for fig in sorted(glob.glob(os.path.join(root, "figures", "dendrogram_*.png"))):
    blocks.append(("img", fig, os.path.basename(fig)[:-4]))
  return blocks


def prediction_section(pipe) -> List[Block]:
  root = os.path.join(pipe.out, "prediction")
  blocks: List[Block] = [("h", 2, "Predicting merge damage δ(i, j) from geometry")]
  path = os.path.join(root, merge_prediction.SUMMARY_FILE)
  if not os.path.exists(path):
    why = ("needs LoRA runs of at least 4 tasks" if not pipe.prediction_ready()
           else "not computed yet")
    return blocks + [("p", f"Not run in this preset ({why}).")]
  r = io_utils.read_json(path)
  rows = []
  for name, v in r["predictors"].items():
    kind = "baseline" if name in merge_prediction.BASELINES else "model"
    rows.append([name, kind, "undefined (constant)" if v["mean_spearman"] is None
                 else f"{v['mean_spearman']:.3f}", _fmt(v["mean_mae"], 4),
                 v.get("num_undefined_spearman", 0)])
  blocks += [("p", f"{r.get('delta_definition', merge_prediction.DELTA_DEFINITION)}, "
                   f"{r.get('method')} merges scored by {r.get('score')}. Leave-one-task-out "
                   f"over {len(r['tasks'])} tasks ({r['num_pairs']} pairs, "
                   f"{len(r['features'])} geometry features): for each task i, fit on the "
                   "pairs that do not involve i, predict δ(i, ·); mean over held-out tasks. "
                   "Baselines: the mean δ of the training pairs, and the single best "
                   "distance feature (what paper A's Table 3 ranks)."),
             ("table", ["predictor", "kind", "mean held-out Spearman ρ", "mean held-out MAE",
                        "tasks with undefined ρ"], rows)]
  fig = os.path.join(root, merge_prediction.FIGURE_FILE)
  if os.path.exists(fig):
    blocks.append(("img", fig, "predicted vs measured δ(i, j), task i held out"))
  return blocks


def _study_section(pipe, name: str, title: str, figure_glob: str = "*.png",
                   max_figures: int = 6) -> List[Block]:
  root = os.path.join(pipe.out, name)
  blocks: List[Block] = [("h", 2, title)]
  summary = os.path.join(root, "summary.json")
  if not os.path.exists(summary):
    return blocks + [("p", "Not run in this preset.")]
  s = io_utils.read_json(summary)
  md = os.path.join(root, "report.md")
  if os.path.exists(md):
    with open(md) as f:
      blocks.append(("md", f.read()))
  blocks += finding_blocks(s.get("findings", []))
  figs = sorted(glob.glob(os.path.join(root, "**", figure_glob), recursive=True))
  for fig in figs[:max_figures]:
    blocks.append(("img", fig, os.path.relpath(fig, root)))
  return blocks


def build(pipe) -> List[Block]:
  p = pipe.preset
  state_path = os.path.join(pipe.out, "pipeline_state.json")
  state = io_utils.read_json(state_path) if os.path.exists(state_path) else {}
  total = sum(v.get("seconds", 0) for v in state.get("steps", {}).values())
  blocks: List[Block] = [
      ("h", 1, f"tvgeo_jax reproduction — preset '{p.name}'"),
      ("p", f"Generated {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; base model "
            f"{p.model}; {len(p.tasks)} tasks × methods {', '.join(p.methods)} × {p.seeds} "
            "seed(s)" + (f" (the seeds on {', '.join(p.seed_tasks)}; one seed elsewhere)"
                         if p.seeds > 1 and p.seed_tasks else "") + "; compute time "
            f"of the steps run so far {total / 60:.1f} min. Every finding below was computed "
            "by its study from the saved results of this run."),
  ]
  blocks += judging_blocks()
  blocks += scores_section(pipe)
  blocks += distances_section(pipe)
  blocks += _study_section(pipe, "merge", "Table 3 — merging interference and distances; TIES "
                                         "analyses (papers A and C)")
  blocks += prediction_section(pipe)
  blocks += _study_section(pipe, "representations",
                           "Paper B — CKA, SVCCA, PWCCA, Procrustes and UMAP of representations")
  blocks += _study_section(pipe, "one_vs_rest", "Paper D — one-vs-rest vs multiclass LoRA")
  return blocks


def write_report(pipe) -> Dict[str, str]:
  blocks = build(pipe)
  md_path = os.path.join(pipe.out, "report.md")
  html_path = os.path.join(pipe.out, "report.html")
  io_utils.atomic_write_text(md_path, to_markdown(blocks, pipe.out))
  io_utils.atomic_write_text(html_path, to_html(blocks, f"tvgeo_jax — {pipe.preset.name}"))
  return {"markdown": md_path, "html": html_path}
