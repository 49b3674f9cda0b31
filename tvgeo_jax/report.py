"""The reproduction report: report.md and a self-contained report.html (figures inlined).

The report is built as a list of blocks (heading, paragraph, table, image, markdown)
rendered twice, so the two files always say the same thing. Every "finding" line is
computed from the saved results (``tvgeo_jax.findings``), never assumed.
"""
from __future__ import annotations

import base64
import datetime
import glob
import html
import os
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tvgeo_jax import findings, io_utils

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


def _yes(b: bool) -> str:
  return "yes" if b else "no"


def scores_section(pipe) -> List[Block]:
  from tvgeo_jax import runs
  p = pipe.preset
  rows = []
  for task in p.tasks:
    row = [task]
    for method in p.methods:
      d = pipe.run_dir(task, method)
      if not runs.is_finished(d):
        row.append("–")
        continue
      res = io_utils.read_json(os.path.join(d, runs.RESULTS))
      test = res["metrics"]["test"]
      main = test.get("main")
      row.append(f"{100 * main:.2f}" if main is not None else "–")
    rows.append(row)
  blocks: List[Block] = [
      ("h", 2, "Table 2 — test scores per task and method"),
      ("p", f"Base model: {p.model}. Main metric of each task (×100): MCC for CoLA, F1 for "
            "MRPC/QQP, Pearson for STS-B, accuracy otherwise. Paper A (roberta-base): e.g. "
            "SST2 93.69/93.92, MNLI 85.75/86.73 (f-FT/LoRA)."),
      ("table", ["task"] + [f"{m}" for m in p.methods], rows)]
  lora_vs_full = [(float(r[2]) - float(r[1])) for r in rows
                  if len(r) > 2 and "–" not in r[1:3]] if "full" in p.methods and "lora" in p.methods else []
  if lora_vs_full:
    blocks.append(("p", f"Finding (paper A: LoRA matches full fine-tuning within about a point): "
                        f"mean LoRA − full = {np.mean(lora_vs_full):+.2f} points over "
                        f"{len(lora_vs_full)} tasks; within 2 points on "
                        f"{sum(abs(x) <= 2 for x in lora_vs_full)} of {len(lora_vs_full)}."))
  return blocks


def _load_npz(path: str):
  return np.load(path, allow_pickle=False) if os.path.exists(path) else None


def distances_section(pipe) -> List[Block]:
  blocks: List[Block] = [("h", 2, "Figures 2 and 3 — geometry of task vectors")]
  for method in pipe.preset.methods:
    root = os.path.join(pipe.out, "distances", method)
    z = _load_npz(os.path.join(root, "distances.npz"))
    if z is None:
      blocks.append(("p", f"{method}: distances not computed."))
      continue
    names = [str(n) for n in z["task_names"]]
    title = "full fine-tuning (Figure 2)" if method == "full" else "LoRA (Figure 3)"
    blocks.append(("h", 3, title))
    rows = []
    for module in [str(m) for m in z["module_names"]]:
      for metric in ("l2", "cosine", "grassmann"):
        key = f"{module}/product/{metric}"
        if key not in z:
          continue
        d = np.nanmean(z[key], axis=-1)
        g = findings.group_agreement(d, names)
        rows.append([module, metric, _fmt(g["share"], 2), _fmt(g["chance"], 2),
                     ", ".join(findings.describe_groups(g))])
    blocks.append(("table", ["module", "metric", "share of tasks whose nearest neighbour is in "
                             "their paper group", "chance", "per group"], rows))
    cos = [r for r in rows if r[1] == "cosine"]
    l2 = [r for r in rows if r[1] == "l2"]
    if cos and l2:
      c = np.mean([float(r[2]) for r in cos])
      e = np.mean([float(r[2]) for r in l2])
      blocks.append(("p", f"Finding (paper A: cosine groups related tasks, L2 does not): "
                          f"grouping share cosine {c:.2f} vs L2 {e:.2f} (chance "
                          f"{float(cos[0][3]):.2f}) — cosine groups better than L2: "
                          f"{_yes(c > e)}; cosine above chance: {_yes(c > float(cos[0][3]))}."))
    for fig in sorted(glob.glob(os.path.join(root, "figures", "pca_product_*.png"))):
      if "plus" in fig and "cosine" not in fig:
        continue
      blocks.append(("img", fig, f"{method}: {os.path.basename(fig)[:-4]}"))
    if method == "lora":
      blocks += figure4_blocks(z, names, root)
  return blocks


def figure4_blocks(z, names, root) -> List[Block]:
  blocks: List[Block] = [("h", 3, "Figure 4 — clustering on A alone and B alone")]
  rows, verdicts = [], []
  for module in [str(m) for m in z["module_names"]]:
    keys = [f"{module}/{f}/cosine" for f in ("a", "b", "product")]
    if not all(k in z for k in keys):
      continue
    d_a, d_b, d_ba = (np.nanmean(z[k], axis=-1) for k in keys)
    r = findings.factor_resemblance(d_a, d_b, d_ba)
    verdicts.append(r["B_resembles_BA_more"])
    rows.append([module, _fmt(r["rho_B_vs_BA"]), _fmt(r["rho_A_vs_BA"]),
                 _yes(r["B_resembles_BA_more"])])
  blocks.append(("table", ["module", "ρ(cos B, cos BA)", "ρ(cos A, cos BA)",
                           "B closer to BA than A"], rows))
  blocks.append(("p", "Finding (paper A: B alone resembles BA, A alone does not): "
                      f"{_yes(all(verdicts))} for {sum(verdicts)} of {len(verdicts)} modules. "
                      "Caveat: A and B alone are not identifiable (B·M, M⁻¹·A give the same "
                      "ΔW); col(B) is."))
  for fig in sorted(glob.glob(os.path.join(root, "figures", "dendrogram_*.png"))):
    blocks.append(("img", fig, os.path.basename(fig)[:-4]))
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
  for line in s.get("findings", []):
    blocks.append(("p", "Finding " + line))
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
            f"{p.model}; {len(p.tasks)} tasks × methods {', '.join(p.methods)}; compute time "
            f"of the steps run so far {total / 60:.1f} min. Every finding below is computed "
            "from the saved results of this run."),
  ]
  blocks += scores_section(pipe)
  blocks += distances_section(pipe)
  blocks += _study_section(pipe, "merge", "Table 3 — merging interference and distances; TIES "
                                         "analyses (papers A and C)")
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
