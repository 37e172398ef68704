"""The explorer: one self-contained page per score set (`explorer.html` beside its scores) to browse a whole analysis.

Its data is `explorer.json` beside the page: other scripts (evaluate_lds.py score, detect_mislabeled.py) add their
results to that file, and the page is rendered again from it; the page itself is never read back.

Every query (text, gold label, the model's prediction and margin), filtered by text, label or correctness and sorted
by margin or by its largest influence; for the selected query its top-k most positive and most negative training
examples (text, label, score, rank, share of the query's total absolute influence); with self-influence scores, the
training set's most self-influential examples (the label-error candidates); for a selected training example, the
queries whose top-k lists it is in, and the examples in the most lists. `#query=N` (`#train=J`) in the address opens
on that query (training example). The data is inline JSON and the page makes no request of any kind, so it opens from
`file://` anywhere; only the training examples it shows are embedded, so its size grows with queries x k, not with
the training set. All text from the data is inserted as text, never as markup.
"""

import json
import logging
import os
import pathlib

import numpy as np

from . import checkpoints, pipeline, progress, results
from .detection import held_out_harm
from .errors import GlueError

TOP_K = 10  # training examples shown per query and side
SELF_TOP = 200  # training examples shown by self-influence

logger = logging.getLogger(__name__)


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


PAGE_NAME = "explorer.html"


def data_path(page: str) -> str:
    """The data file beside a page: explorer.json for explorer.html."""
    return os.path.splitext(page)[0] + ".json"


def write_explorer(path: str, data: dict) -> None:
    """Writes the data (`explorer.json`) beside the page at `path`, then the page rendered from it, each under a
    temporary name renamed once complete. They are a view of verified results, not a result: no manifest lists
    them, and later runs (analyze.py, evaluate_lds.py score, detect_mislabeled.py) write them anew."""
    with results.atomic_path(data_path(path)) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False, separators=(",", ":"))
    with results.atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(render(data))


def address(page: str, **view) -> str:
    """The page's file:// address, opening on one view: address(page, query=3) ends in #query=3."""
    return pathlib.Path(page).resolve().as_uri() + "".join(f"#{kind}={index}" for kind, index in view.items())


def read_data(path: str) -> dict | None:
    """The data of the page at `path` (its explorer.json), to enrich it with another script's results; None if there
    is none. A page written before its data was kept beside it has none: analyze.py writes both again (it reuses the
    finished scores)."""
    if not os.path.isfile(data_path(path)):
        if os.path.isfile(path):
            logger.warning("%s has no %s beside it (a page from an older version): rerun the analyze.py command that "
                           "wrote it (it reuses the scores) to write both, then this command to add its results", path,
                           os.path.basename(data_path(path)))
        return None
    try:
        with open(data_path(path), encoding="utf-8") as f:
            return json.load(f)
    except ValueError:
        raise GlueError(f"{data_path(path)} is damaged; rerun the analyze.py command that wrote it") from None


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
    path = os.path.join(folder, PAGE_NAME)
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
#view { flex: 3 1 480px; min-width: 0; padding: 8px 16px; height: calc(100vh - 64px); overflow: auto; }
.controls { padding: 8px; display: flex; flex-wrap: wrap; gap: 6px; position: sticky; top: 0; background: #fff;
            z-index: 1; }
.controls input { flex: 1 1 160px; } ol#queries { list-style: none; margin: 0; padding: 0; }
#queries li { padding: 6px 10px 6px 7px; border-bottom: 1px solid #eee; border-left: 4px solid transparent;
              cursor: pointer; }
#queries li.group { cursor: default; background: #f3f3f3; color: #555; font-size: 12px; border-left: none; }
#queries li[data-index]:hover:not([aria-selected="true"]) { background: #f2f6ff; }
#queries li[aria-selected="true"] { background: #dbe7ff; border-left-color: #2456c8; }
#queries li:focus { outline: none; }
#queries li:focus-visible { outline: 3px solid #e07b00; outline-offset: -3px; }
.wrong { color: #b00; } .meta { color: #666; font-size: 12px; }
table { border-collapse: collapse; width: 100%; margin: 6px 0 16px; }
caption { text-align: left; color: #444; }
th, td { border-bottom: 1px solid #eee; padding: 4px 6px; text-align: left; vertical-align: top; }
td.num { text-align: right; white-space: nowrap; font-variant-numeric: tabular-nums; }
.pos { color: #1a7a30; } .neg { color: #b02a2a; } .text { white-space: pre-wrap; overflow-wrap: anywhere; }
.w { border-radius: 3px; padding: 0 1px; } .flag { font-weight: bold; color: #8a4b00; }
a { color: #1d4fb8; }
@media (max-width: 800px) {
  #side { height: auto; max-height: 45vh; max-width: none; border-right: none; border-bottom: 2px solid #ccc; }
  #view { height: auto; }
}
@media (max-width: 600px) {  /* tables as cards: the numbers wrap above a full-width text */
  table, caption { display: block; } tr.head { display: none; }
  tr { display: flex; flex-wrap: wrap; gap: 0 12px; padding: 4px 0; border-bottom: 1px solid #ddd; }
  td { border: none; padding: 0 2px; } td.text { flex: 1 1 100%; }
  td[data-h]::before { content: attr(data-h) ": "; color: #777; }
}
</style></head>
<body>
<header><h1 id="title"></h1><div class="sub" id="summary"></div></header>
<main>
<section id="side" aria-label="queries and training examples">
  <div class="controls">
    <input id="filter" type="search" placeholder="filter queries and training examples by text"
           aria-label="filter queries and training examples by text">
    <select id="label" aria-label="label"><option value="">any label</option></select>
    <select id="correct" aria-label="correctness"><option value="">all</option>
      <option value="1">correct</option><option value="0">incorrect</option></select>
    <select id="sort" aria-label="sort">
      <option value="index">dataset order</option><option value="margin">margin, lowest first</option>
      <option value="largest">largest influence first</option>
      <option value="lds">LDS, lowest first</option>
      <option value="stability">ensemble agreement, lowest first</option></select>
  </div>
  <ol id="queries" role="listbox" aria-label="queries (arrow keys move, Enter shows)"></ol>
</section>
<section id="view" aria-live="polite" tabindex="-1"></section>
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
function link(kind, index, text) {  // a link to a query's or a training example's view (#query=N, #train=J)
  const a = el("a", text);
  a.href = "#" + kind + "=" + index;
  a.dataset.go = kind;
  a.dataset.target = index;
  return a;
}
// One format per column: fixed when every value reads well so, else scientific for all of them.
function formatter(values) {
  const scientific = values.some((x) => Math.abs(x) >= 1e4 || (x !== 0 && Math.abs(x) < 1e-3));
  return scientific ? (x) => x.toExponential(3) : (x) => x.toFixed(4);
}
const byIndex = new Map(data.queries.map((q) => [q.index, q]));
const topK = data.queries.length ? data.queries[0].positive.length : 0;
$("title").textContent = data.title;
$("summary").textContent = data.task + ": " + data.queries.length + " queries x " + data.num_train +
  " training examples; positive scores raise the query's margin";
for (const name of [...new Set(data.queries.map((q) => String(q.label)))]) $("label").append(el("option", name));
let selected = null;  // {kind: "query" | "train", index}
const detection = data.detection || null;

// Where each training example sits in the queries' top-k lists (built once, on first use).
let appearances = null;
function lists() {
  if (appearances) return appearances;
  appearances = new Map();
  for (const q of data.queries) {
    for (const side of ["positive", "negative"]) {
      q[side].forEach((e, i) => {
        if (!appearances.has(e.index)) appearances.set(e.index, {positive: [], negative: []});
        appearances.get(e.index)[side].push({query: q.index, score: e.score, rank: i + 1});
      });
    }
  }
  return appearances;
}
function inLists(index) {
  const found = lists().get(index);
  return found ? found.positive.length + found.negative.length : 0;
}
let frequent = null;
function influencers() {  // the training examples in the most top-k lists, most first
  if (!frequent) {
    frequent = [...lists().entries()].map(([index, found]) => ({index, positive: found.positive.length,
      negative: found.negative.length, lists: found.positive.length + found.negative.length}))
      .sort((a, b) => b.lists - a.lists || a.index - b.index);
  }
  return frequent;
}

function cells(tr, values) {  // [header, text, class] triples; the header labels the cell in the narrow layout
  for (const [header, content, cls] of values) {
    const td = el("td", null, cls);
    if (content instanceof Node) td.append(content); else td.textContent = content;
    if (header && header !== "text") td.dataset.h = header;
    tr.append(td);
  }
  return tr;
}
function head(table, headers) {
  const tr = el("tr", null, "head");
  for (const h of headers) tr.append(el("th", h));
  table.append(tr);
}
function row(entry, side, fmt) {
  const tr = el("tr");
  tr.dataset.index = entry.index;
  const example = data.train[String(entry.index)];
  const signed = side === "harm" ? -entry.score : entry.score;
  const values = [["rank", entry.rank, "num"], ["example", link("train", entry.index, "train " + entry.index), "num"],
                  ["score", fmt(entry.score), "num " + (signed >= 0 ? "pos" : "neg")],
                  ["share", entry.share === undefined ? "" : (100 * entry.share).toFixed(2) + "%", "num"],
                  ["label", example.label, ""]];
  const candidate = side === "self" || side === "harm";
  if (!candidate && data.num_members) values.push(["members", entry.members + "/" + data.num_members, "num"]);
  if (candidate && detection) {
    const found = detection.examples[String(entry.index)];
    values.push(["flipped", found && found.flipped ? "flipped" : "", found && found.flipped ? "neg" : ""]);
    (found ? found.ranks : []).forEach((rank, i) => {
      const flagged = rank <= detection.flag_rank;
      values.push(["rank: " + detection.rankings[i], flagged ? "\\u25cf " + rank : String(rank),
                   flagged ? "num flag" : "num"]);
    });
  }
  cells(tr, values);
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
  const extra = side === "self" || side === "harm"
    ? (detection ? ["label flipped", ...detection.rankings.map((r) => "rank: " + r)] : [])
    : (data.num_members ? ["in members' top " + topK] : []);
  head(t, ["rank", "example", "score", "share", "label", ...extra, "text"]);
  const fmt = formatter(entries.map((e) => e.score));
  entries.forEach((e, i) => t.append(row({...e, rank: i + 1}, side, fmt)));
  return t;
}
function influencerTable(count) {
  const t = el("table"), top = influencers().slice(0, count);
  t.id = "influencers";
  t.append(el("caption", top.length + " of the " + influencers().length + " training examples that fill the " +
    2 * topK * data.queries.length + " top-" + topK + " slots, by the number of lists they are in"));
  head(t, ["rank", "example", "lists", "positive", "negative", "label", "text"]);
  top.forEach((e, i) => {
    const tr = el("tr"), example = data.train[String(e.index)];
    tr.dataset.index = e.index;
    cells(tr, [["rank", i + 1, "num"], ["example", link("train", e.index, "train " + e.index), "num"],
               ["lists", e.lists, "num"], ["positive", e.positive, "num pos"], ["negative", e.negative, "num neg"],
               ["label", example.label, ""], ["text", example.texts.join("\\n"), "text"]]);
    t.append(tr);
  });
  return t;
}
function queryTable(found, caption, id, order) {  // the queries whose top-k lists hold one training example
  const t = el("table"), shown = [...found].sort(order).slice(0, 100);
  t.id = id;
  t.append(el("caption", caption + (found.length > shown.length ? " (the first " + shown.length + " of " +
    found.length + ")" : " (" + found.length + ")")));
  head(t, ["query", "score", "its rank", "label", "prediction", "margin", "text"]);
  const fmt = formatter(shown.map((f) => f.score));
  for (const f of shown) {
    const q = byIndex.get(f.query), tr = el("tr");
    tr.dataset.query = f.query;
    cells(tr, [["query", link("query", f.query, "#" + f.query), "num"],
               ["score", fmt(f.score), "num " + (f.score >= 0 ? "pos" : "neg")], ["its rank", f.rank, "num"],
               ["label", q.label, ""], ["prediction", q.prediction, q.correct === false ? "wrong" : ""],
               ["margin", q.margin.toFixed(3), "num"], ["text", q.texts.join("\\n"), "text"]]);
    t.append(tr);
  }
  return t;
}
function candidates(view) {  // the training set's label-error candidates and its most frequent influencers
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
      "from held-out labels" + (detection ? "; \\u25cf: in the top " + detection.flag_rank + " of that ranking" : ""),
      "harm"));
  }
  if (data.queries.length > 1) {
    view.append(el("h2", "Training examples in the most top-" + topK + " lists"));
    view.append(influencerTable(20));
  }
}
function showQuery(q) {
  const view = $("view");
  view.replaceChildren();
  view.append(el("h2", "Query " + q.index));
  view.append(el("p", q.texts.join("\\n"), "text"));
  view.append(el("p", "label " + q.label + " \\u00b7 prediction " + q.prediction + " \\u00b7 margin " +
                 q.margin.toFixed(3) + (q.correct === false ? " (wrong)" : "") +
                 (q.lds == null ? "" : " \\u00b7 LDS " + q.lds.toFixed(3) +
                 " (how well these scores predict retraining, for this query)") +
                 (q.stability == null ? "" : " \\u00b7 top examples shared with a member: " +
                  (100 * q.stability).toFixed(0) + "%"),
                 q.correct === false ? "wrong" : "meta"));
  view.append(table(q.positive, "Most positively influential: raise the margin of the gold label", "positive"));
  view.append(table(q.negative, "Most negatively influential: lower it", "negative"));
  candidates(view);
}
function showTrain(index) {
  const view = $("view"), example = data.train[String(index)];
  const found = lists().get(index) || {positive: [], negative: []};
  view.replaceChildren();
  view.append(el("h2", "Training example " + index));
  view.append(el("p", example.texts.join("\\n"), "text"));
  const rank = influencers().findIndex((e) => e.index === index);
  view.append(el("p", "label " + example.label + " \\u00b7 in the top-" + topK + " lists of " +
    (found.positive.length + found.negative.length) + " of " + data.queries.length + " queries: " +
    found.positive.length + " most positive, " + found.negative.length + " most negative" +
    (rank < 0 ? "" : " \\u00b7 rank " + (rank + 1) + " of " + influencers().length + " by lists"), "meta"));
  if (found.positive.length) {
    view.append(queryTable(found.positive, "Queries whose margin it raises the most (it is in their most positive " +
      "top " + topK + ")", "train-positive", (a, b) => b.score - a.score));
  }
  if (found.negative.length) {
    view.append(queryTable(found.negative, "Queries whose margin it lowers the most (it is in their most negative " +
      "top " + topK + ")", "train-negative", (a, b) => a.score - b.score));
  }
  candidates(view);
}
const narrow = window.matchMedia("(max-width: 800px)");
function show(kind, index, push) {  // one view; the address names it (#query=N, #train=J)
  if (kind === "query" && !byIndex.has(index)) return false;
  if (kind === "train" && !data.train[String(index)]) return false;
  selected = {kind, index};
  if (kind === "query") showQuery(byIndex.get(index)); else showTrain(index);
  for (const li of $("queries").querySelectorAll("li[data-index]")) {
    li.setAttribute("aria-selected", String(li.dataset.kind === kind && Number(li.dataset.index) === index));
  }
  if (push) {
    try { history.pushState(null, "", "#" + kind + "=" + index); } catch (err) { /* file:// may refuse: fine */ }
  }
  const view = $("view");
  view.scrollTop = 0;
  if (push && narrow.matches) view.scrollIntoView({block: "start"});  // the list stands above the view
  return true;
}
function route() {
  const match = /^#(query|train)=(\\d+)$/.exec(location.hash);
  if (match && show(match[1], Number(match[2]), false)) return;
  if (data.queries.length) show("query", data.queries[0].index, false);
}
document.addEventListener("click", (event) => {
  const a = event.target.closest("a[data-go]");
  if (!a || event.ctrlKey || event.metaKey || event.shiftKey) return;
  event.preventDefault();
  show(a.dataset.go, Number(a.dataset.target), true);
});
window.addEventListener("popstate", route);
window.addEventListener("hashchange", route);

function item(kind, index, first, second, wrong) {
  const li = el("li");
  li.setAttribute("role", "option");
  li.tabIndex = -1;
  li.dataset.kind = kind;
  li.dataset.index = index;
  li.setAttribute("aria-selected", String(selected !== null && selected.kind === kind && selected.index === index));
  li.append(el("div", first), el("div", second, wrong ? "meta wrong" : "meta"));
  return li;
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
    ol.append(item("query", q.index, q.texts[0], "#" + q.index + " \\u00b7 " + q.label + " \\u00b7 margin " +
                   q.margin.toFixed(2) + (q.lds == null ? "" : " \\u00b7 LDS " + q.lds.toFixed(2)),
                   q.correct === false));
  }
  if (text && !correct) {  // the training examples the page holds whose text matches, in the most lists first
    const train = Object.entries(data.train).map(([j, e]) => [Number(j), e])
      .filter(([, e]) => e.texts.join(" ").toLowerCase().includes(text) && (!label || String(e.label) === label))
      .sort(([a], [b]) => inLists(b) - inLists(a) || a - b);
    const group = el("li", "training examples on this page: " + train.length +
                     (train.length > 200 ? " (the first 200)" : ""), "group");
    group.setAttribute("role", "presentation");
    ol.append(group);
    for (const [j, e] of train.slice(0, 200)) {
      ol.append(item("train", j, e.texts[0], "train " + j + " \\u00b7 " + e.label + " \\u00b7 in " + inLists(j) +
                     " top-" + topK + " lists", false));
    }
  }
  const current = ol.querySelector('li[aria-selected="true"]') || ol.querySelector("li[data-index]");
  if (current) current.tabIndex = 0;  // the list is one Tab stop: arrow keys move within it
}
function focusItem(li) {
  if (!li) return;
  for (const other of $("queries").querySelectorAll('li[tabindex="0"]')) other.tabIndex = -1;
  li.tabIndex = 0;
  li.focus();
}
$("queries").addEventListener("click", (event) => {
  const li = event.target.closest("li[data-index]");
  if (!li) return;
  focusItem(li);
  show(li.dataset.kind, Number(li.dataset.index), true);
});
$("queries").addEventListener("keydown", (event) => {
  const li = event.target.closest("li[data-index]");
  if (!li) return;
  const items = [...$("queries").querySelectorAll("li[data-index]")], at = items.indexOf(li);
  const to = {ArrowDown: at + 1, ArrowUp: at - 1, Home: 0, End: items.length - 1, PageDown: at + 10,
              PageUp: at - 10}[event.key];
  if (to !== undefined) {
    event.preventDefault();
    focusItem(items[Math.max(0, Math.min(items.length - 1, to))]);
  } else if (event.key === "Enter" || event.key === " ") {
    event.preventDefault();
    show(li.dataset.kind, Number(li.dataset.index), true);
  }
});
// The filter on input only: its change event comes with the blur of a click on the list, and would redraw the list
// under that click.
$("filter").addEventListener("input", render);
for (const id of ["label", "correct", "sort"]) $(id).addEventListener("change", render);
route();
render();
</script>
</body></html>
"""
