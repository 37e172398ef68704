"""The explorer: one self-contained page per score set (`explorer.html` beside its scores) to browse a whole analysis.

Every query (text, gold label, the model's prediction and margin), filtered by text, label or correctness and sorted
by margin or by its largest influence; for the selected query its top-k most positive and most negative training
examples (text, label, score, rank, share of the query's total absolute influence); with self-influence scores, the
training set's most self-influential examples (the label-error candidates). The data is inline JSON and the page
makes no request of any kind, so it opens from `file://` anywhere; only the training examples it shows are embedded,
so its size grows with queries x k, not with the training set. All text from the data is inserted as text, never as
markup.
"""

import json
import os
import re

import numpy as np

from . import checkpoints, pipeline, progress, results
from .detection import held_out_harm

TOP_K = 10  # training examples shown per query and side
SELF_TOP = 200  # training examples shown by self-influence


def top_sides(row: np.ndarray, top_k: int) -> dict:
    """{"positive": the top_k training indices by score, "negative": the bottom top_k, lowest first}."""
    order = np.argsort(-row, kind="stable")
    return {"positive": order[:top_k], "negative": order[::-1][:top_k]}


def explorer_data(title: str, task_name: str, pairwise: np.ndarray, query_text, train_text, predictions: dict,
                  self_scores: np.ndarray | None = None, top_k: int = TOP_K, tokens: dict | None = None,
                  members: list | None = None) -> dict:
    """What the page shows, as JSON: queries with their top examples (training indices and scores, in the order of
    the scores), the embedded training examples, and the self-influence ranking. `tokens` ({query: {training index:
    words}}, report.words) shades those examples word by word; `members` (an ensemble's member score sets) gives
    each top example the number of members that have it in their own top k, and each query its mean overlap."""
    task = pipeline.get_task(task_name)
    label = task.label_name
    shown, queries = set(), []
    for q, row in enumerate(pairwise):
        total = float(np.abs(row).sum()) or 1.0
        sides = top_sides(row, top_k)
        top = {side: [{"index": int(j), "score": float(row[j]), "share": float(row[j]) / total}
                      for j in picks] for side, picks in sides.items()}
        stability = None
        if members:
            member_tops = [top_sides(m[q], top_k) for m in members]
            for side, entries in top.items():
                for entry in entries:
                    entry["members"] = sum(entry["index"] in set(t[side].tolist()) for t in member_tops)
            stability = float(np.mean([e["members"] for e in top["positive"]]) / len(members))
        for entry in (e for side in top.values() for e in side):
            words = (tokens or {}).get(q, {}).get(entry["index"])
            if words is not None:
                entry["words"] = [[segment, text, score] for segment, text, score in words]
        shown.update(e["index"] for side in top.values() for e in side)
        example = query_text[q]
        queries.append({"index": q, "texts": [example[k] for k in task.keys], "label": label(example["label"]),
                        "prediction": label(predictions["predictions"][q]), "margin": float(predictions["margins"][q]),
                        "correct": bool(predictions["correct"][q]) if "correct" in predictions else None,
                        "largest": float(np.abs(row).max()), "stability": stability, **top})
    def top(suspicion: np.ndarray) -> list:
        order = np.argsort(-suspicion, kind="stable")[:SELF_TOP]
        shown.update(int(j) for j in order)
        return [{"index": int(j), "score": float(suspicion[j])} for j in order]

    ranking = [] if self_scores is None else top(self_scores)
    harm = top(held_out_harm(pairwise)) if len(pairwise) > 1 else []  # one query: its negative side, shown above
    train = {str(j): {"texts": [train_text[j][k] for k in task.keys], "label": label(train_text[j]["label"])}
             for j in sorted(shown)}
    return {"title": title, "task": task_name, "keys": list(task.keys), "num_train": len(train_text),
            "num_members": len(members) if members else None, "queries": queries, "train": train,
            "self_influence": ranking, "harm": harm}


def render(data: dict) -> str:
    """The page: data inline (`<` escaped, so no text can close the script element), rendered by a little vanilla
    JavaScript that only ever sets textContent."""
    payload = json.dumps(data, ensure_ascii=False)
    for raw, escaped in (("<", "\\u003c"), ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        payload = payload.replace(raw, escaped)
    return PAGE.replace("__DATA__", payload)


def write_explorer(path: str, data: dict) -> None:
    """Writes the page under a temporary name and renames it. It is a view of verified results, not a result: no
    manifest lists it, and later runs (analyze.py, evaluate_lds.py score) write it anew."""
    with results.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(render(data))


def read_data(path: str) -> dict | None:
    """The data of an existing page (None if there is none), to enrich it with another script's results."""
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        match = re.search(r'<script type="application/json" id="data">(.*?)</script>', f.read(), re.S)
    return json.loads(match.group(1)) if match else None


def add_lds(path: str, per_query: list, ground_truth: str) -> bool:
    """Adds each query's LDS (evaluate_lds.py score) to the page at `path`, if there is one; True if there was."""
    data = read_data(path)
    if data is None:
        return False
    for query in data["queries"]:
        query["lds"] = per_query[query["index"]] if query["index"] < len(per_query) else None
    data["lds_ground_truth"] = ground_truth
    write_explorer(path, data)
    return True


def add_detection(path: str, suspicion: dict, flipped: np.ndarray, flag_fraction: float) -> bool:
    """Adds detect_mislabeled.py's rankings to the page at `path`, if there is one: for each candidate (by
    self-influence and by harm) its rank under every ranking (flagged: in the top `flag_fraction`) and whether its
    label was flipped."""
    data = read_data(path)
    if data is None:
        return False
    ranks = {name: np.empty(len(s), dtype=int) for name, s in suspicion.items()}
    for name, s in suspicion.items():
        ranks[name][np.argsort(-s, kind="stable")] = np.arange(1, len(s) + 1)
    data["detection"] = {
        "rankings": list(suspicion), "flag_rank": round(flag_fraction * len(flipped)),
        "examples": {str(e["index"]): {"flipped": bool(flipped[e["index"]]),
                                       "ranks": [int(r[e["index"]]) for r in ranks.values()]}
                     for e in data["self_influence"] + data.get("harm", [])}}
    write_explorer(path, data)
    return True


def explore_scores(config, checkpoint_dir: str, pairwise: np.ndarray, scores_name: str, query_text, train_text,
                   folder: str, members: list | None = None, tokens: dict | None = None) -> str:
    """analyze.py's page for a published score set: the checkpoint's predictions on the queries (one forward pass;
    an ensemble's: its first member's, as the title says), the scores, with --compute_self_scores the
    self-influence, with an ensemble its `members`' agreement, with `tokens` the shading of those examples; written
    to <folder>/explorer.html."""
    from .scores import load_scores

    progress.stage("writing the explorer", folder)
    model, tokenizer, _ = checkpoints.load_checkpoint(checkpoint_dir, config.dataset_name)
    queries = pipeline.tokenize(query_text, config.dataset_name, tokenizer, config.max_seq_length,
                                config.pad_to_max_length)
    evaluated = pipeline.evaluate(model, queries, pipeline.collator(tokenizer), config.dataset_name,
                                  config.query_batch_size, config.device)
    regression = pipeline.get_task(config.dataset_name).is_regression
    evaluated["predictions"] = evaluated["margins"] if regression else evaluated["probabilities"].argmax(-1)
    self_scores = (load_scores(config.output_dir, config.dataset_name, scores_name, kind="self")[0]
                   if config.compute_self_scores else None)
    title = (f"{config.dataset_name}: {scores_name} scores of the ensemble {os.path.dirname(checkpoint_dir)} "
             f"(predictions and margins of {os.path.basename(checkpoint_dir)})" if members
             else f"{config.dataset_name}: {scores_name} scores of {checkpoint_dir}")
    path = os.path.join(folder, "explorer.html")
    write_explorer(path, explorer_data(title, config.dataset_name, pairwise, query_text, train_text, evaluated,
                                       self_scores, tokens=tokens, members=members))
    return path


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy"
      content="default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Explorer</title>
<style>
body { font: 14px/1.5 "DejaVu Sans", sans-serif; margin: 0; color: #222; }
header { padding: 10px 16px; background: #f3f3f3; border-bottom: 1px solid #ddd; }
h1 { font-size: 17px; margin: 0 0 4px; } .sub { color: #555; font-size: 13px; }
main { display: flex; flex-wrap: wrap; }
#side { flex: 1 1 340px; max-width: 460px; border-right: 1px solid #ddd; height: calc(100vh - 64px); overflow: auto; }
#view { flex: 3 1 480px; padding: 8px 16px; height: calc(100vh - 64px); overflow: auto; }
.controls { padding: 8px; display: flex; flex-wrap: wrap; gap: 6px; position: sticky; top: 0; background: #fff; }
.controls input { flex: 1 1 160px; } ol#queries { list-style: none; margin: 0; padding: 0; }
#queries li { padding: 6px 10px; border-bottom: 1px solid #eee; cursor: pointer; }
#queries li:focus, #queries li:hover { background: #eef4ff; outline: none; }
#queries li[aria-selected="true"] { background: #dbe7ff; }
.wrong { color: #b00; } .meta { color: #666; font-size: 12px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 16px; }
th, td { border-bottom: 1px solid #eee; padding: 4px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.pos { color: #1a7a30; } .neg { color: #b02a2a; } .text { white-space: pre-wrap; overflow-wrap: anywhere; }
.w { border-radius: 3px; padding: 0 1px; } .flag { font-weight: bold; color: #8a4b00; }
@media (max-width: 800px) { #side, #view { height: auto; max-width: none; border-right: none; } }
</style></head>
<body>
<header><h1 id="title"></h1><div class="sub" id="summary"></div></header>
<main>
<section id="side" aria-label="queries">
  <div class="controls">
    <input id="filter" type="search" placeholder="filter queries by text" aria-label="filter queries by text">
    <select id="label" aria-label="label"><option value="">any label</option></select>
    <select id="correct" aria-label="correctness"><option value="">all</option>
      <option value="1">correct</option><option value="0">incorrect</option></select>
    <select id="sort" aria-label="sort">
      <option value="index">dataset order</option><option value="margin">margin, lowest first</option>
      <option value="largest">largest influence first</option>
      <option value="lds">LDS, lowest first</option>
      <option value="stability">ensemble agreement, lowest first</option></select>
  </div>
  <ol id="queries"></ol>
</section>
<section id="view" aria-live="polite"></section>
</main>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const $ = (id) => document.getElementById(id);
function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
const fmt = (x) => Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(3) : x.toFixed(4);
$("title").textContent = data.title;
$("summary").textContent = data.task + ": " + data.queries.length + " queries x " + data.num_train +
  " training examples; positive scores raise the query's margin";
for (const name of [...new Set(data.queries.map((q) => String(q.label)))]) $("label").append(el("option", name));
let selected = null;
const detection = data.detection || null;

function row(entry, side) {
  const tr = el("tr");
  tr.dataset.index = entry.index;
  const example = data.train[String(entry.index)];
  tr.append(el("td", entry.rank, "num"), el("td", "train " + entry.index, "num"),
            el("td", fmt(entry.score), "num " + ((side === "harm" ? -entry.score : entry.score) >= 0 ? "pos" : "neg")),
            el("td", entry.share === undefined ? "" : (100 * entry.share).toFixed(2) + "%", "num"),
            el("td", example.label));
  const candidate = side === "self" || side === "harm";
  if (!candidate && data.num_members) tr.append(el("td", entry.members + "/" + data.num_members, "num"));
  if (candidate && detection) {
    const found = detection.examples[String(entry.index)];
    tr.append(el("td", found && found.flipped ? "flipped" : "", found && found.flipped ? "neg" : ""));
    for (const rank of found ? found.ranks : []) {
      tr.append(el("td", rank <= detection.flag_rank ? "\u25cf " + rank : String(rank),
                   rank <= detection.flag_rank ? "num flag" : "num"));
    }
  }
  tr.append(entry.words ? shaded(entry.words) : el("td", example.texts.join("\\n"), "text"));
  return tr;
}
function shaded(words) {  // the token report's colours: green raises the margin, red lowers it
  const cell = el("td", null, "text"), scale = Math.max(...words.map((w) => Math.abs(w[2]))) || 1;
  let segment = 0;
  for (const [part, text, score] of words) {
    if (part !== null && part !== segment) { cell.append(document.createTextNode("\\n")); segment = part; }
    else if (cell.childNodes.length) cell.append(document.createTextNode(" "));
    const chip = el("span", text, "w");
    const alpha = (0.08 + 0.72 * Math.min(Math.abs(score) / scale, 1)).toFixed(3);
    chip.style.background = score >= 0 ? "rgba(40, 160, 70, " + alpha + ")" : "rgba(210, 50, 50, " + alpha + ")";
    chip.title = (score >= 0 ? "+" : "") + score.toPrecision(4);
    cell.append(chip);
  }
  return cell;
}
function table(entries, caption, side) {
  const t = el("table");
  t.id = side;
  t.append(el("caption", caption));
  const head = el("tr");
  const extra = side === "self" || side === "harm"
    ? (detection ? ["label flipped", ...detection.rankings.map((r) => "rank: " + r)] : [])
    : (data.num_members ? ["in members' top " + data.queries[0].positive.length] : []);
  for (const h of ["rank", "example", "score", "share", "label", ...extra, "text"]) head.append(el("th", h));
  t.append(head);
  entries.forEach((e, i) => t.append(row({...e, rank: i + 1}, side)));
  return t;
}
function show(q) {
  selected = q.index;
  for (const li of $("queries").children) li.setAttribute("aria-selected", String(li.dataset.index == q.index));
  const view = $("view");
  view.replaceChildren();
  view.append(el("h2", "Query " + q.index));
  view.append(el("p", q.texts.join("\\n"), "text"));
  view.append(el("p", "label " + q.label + " \\u00b7 prediction " + q.prediction + " \\u00b7 margin " +
                 q.margin.toFixed(3) + (q.lds == null ? "" : " \\u00b7 LDS " + q.lds.toFixed(3) +
                 " (how well these scores predict retraining, for this query)") +
                 (q.stability == null ? "" : " \\u00b7 top examples shared with a member: " +
                  (100 * q.stability).toFixed(0) + "%"),
                 q.correct === false ? "wrong" : "meta"));
  view.append(table(q.positive, "Most positively influential: raise the margin of the gold label", "positive"));
  view.append(table(q.negative, "Most negatively influential: lower it", "negative"));
  if (data.self_influence.length) {
    view.append(el("h2", "Training examples by self-influence (label-error candidates)"));
    view.append(table(data.self_influence, "top " + data.self_influence.length + " of " + data.num_train +
      (detection ? "; \\u25cf: in the top " + detection.flag_rank + " of that ranking (detect_mislabeled.py)" : ""),
      "self"));
  }
  if (data.harm.length) {
    view.append(el("h2", "Training examples by harm to the " + data.queries.length + " queries (label-error " +
                   "candidates)"));
    view.append(table(data.harm, "top " + data.harm.length + " of " + data.num_train + " by minus their " +
      "influence summed over the queries (each query's scores standardised): examples that pull the model away " +
      "from held-out labels" + (detection ? "; \u25cf: in the top " + detection.flag_rank + " of that ranking" : ""),
      "harm"));
  }
}
function render() {
  const text = $("filter").value.toLowerCase(), label = $("label").value, correct = $("correct").value;
  let list = data.queries.filter((q) => (!text || q.texts.join(" ").toLowerCase().includes(text)) &&
    (!label || String(q.label) === label) && (!correct || String(Number(q.correct)) === correct));
  const key = $("sort").value;
  if (key === "margin") list = [...list].sort((a, b) => a.margin - b.margin);
  if (key === "largest") list = [...list].sort((a, b) => b.largest - a.largest);
  if (key === "lds") list = [...list].sort((a, b) => (a.lds ?? Infinity) - (b.lds ?? Infinity));
  if (key === "stability") list = [...list].sort((a, b) => (a.stability ?? Infinity) - (b.stability ?? Infinity));
  const ol = $("queries");
  ol.replaceChildren();
  for (const q of list) {
    const li = el("li");
    li.tabIndex = 0;
    li.dataset.index = q.index;
    li.setAttribute("aria-selected", String(q.index === selected));
    li.append(el("div", q.texts[0]), el("div", "#" + q.index + " \\u00b7 " + q.label + " \\u00b7 margin " +
              q.margin.toFixed(2) + (q.lds == null ? "" : " \\u00b7 LDS " + q.lds.toFixed(2)),
              q.correct === false ? "meta wrong" : "meta"));
    li.addEventListener("click", () => show(q));
    li.addEventListener("keydown", (event) => {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); show(q); }
      if (event.key === "ArrowDown" && li.nextSibling) li.nextSibling.focus();
      if (event.key === "ArrowUp" && li.previousSibling) li.previousSibling.focus();
    });
    ol.append(li);
  }
}
for (const id of ["filter", "label", "correct", "sort"]) {
  $(id).addEventListener("input", render);
  $(id).addEventListener("change", render);
}
render();
if (data.queries.length) show(data.queries[0]);
</script>
</body></html>
"""
