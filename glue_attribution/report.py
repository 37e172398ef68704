"""What a researcher reads: a query with its most influential training examples, the self-influence ranking, and
token-level influence as a page (which words of a training example carry its influence on a query).

The page's scores come from kronfluence's per-token pairwise scores (analyze.py --html); this module groups word
pieces back into words and draws them, coloured like Captum's `visualize_text` (green raises the query's margin, red
lowers it, the colour's strength relative to the example's largest word).
"""

import csv
import html
import logging
import os

import numpy as np

from . import pipeline, results

logger = logging.getLogger(__name__)

POSITIVE, NEGATIVE = (40, 160, 60), (210, 50, 50)


def words(encoding, texts: list, token_scores) -> list:
    """Groups a tokenized example's per-token scores into words: [(segment, text, score), ...] in order, where a
    word is the text its pieces span (offsets) and its score their sum; special tokens stand alone ([CLS] carries
    the pooler and classifier, whose input is its hidden state)."""
    grouped, offsets = [], encoding["offset_mapping"]
    for position, (word, segment) in enumerate(zip(encoding.word_ids(), encoding.sequence_ids())):
        score = float(token_scores[position])
        if word is None:
            grouped.append([None, encoding.tokens()[position], score, None])
        elif grouped and grouped[-1][3] == (segment, word):
            grouped[-1][1] = (grouped[-1][1][0], offsets[position][1])
            grouped[-1][2] += score
        else:
            grouped.append([segment, offsets[position], score, (segment, word)])
    return [(segment, span if segment is None else texts[segment][span[0]:span[1]], score)
            for segment, span, score, _ in grouped]


def _chip(text: str, score: float, scale: float) -> str:
    strength = min(abs(score) / scale, 1.0) if scale > 0 else 0.0
    red, green, blue = POSITIVE if score >= 0 else NEGATIVE
    colour = f"rgba({red}, {green}, {blue}, {0.08 + 0.72 * strength:.3f})"
    return (f'<span class="w" style="background:{colour}" title="{score:+.4g}">{html.escape(text)}</span>')


def example_html(example: dict) -> str:
    """One training example: its header (rank, index, label, score) and its words as coloured chips."""
    scale = max((abs(score) for _, _, score in example["words"]), default=0.0)
    chips, segment = [], 0
    for part, text, score in example["words"]:
        if part is not None and part != segment:
            chips.append("<br>")
            segment = part
        chips.append(_chip(text, score, scale))
    return (f'<div class="ex"><div class="head">{html.escape(example["title"])} &middot; train {example["index"]} '
            f'&middot; label <b>{html.escape(str(example["label"]))}</b> &middot; score {example["score"]:+.4g}'
            f'</div><div class="text">{" ".join(chips)}</div></div>')


def page(title: str, query: dict, examples: list) -> str:
    """The whole report: the query (text, label), then each example."""
    query_text = "<br>".join(html.escape(text) for text in query["texts"])
    body = "\n".join(example_html(example) for example in examples)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font: 15px/1.7 "DejaVu Sans", sans-serif; margin: 24px; max-width: 980px; color: #222; }}
h1 {{ font-size: 19px; }} .q {{ background: #f3f3f3; padding: 10px 14px; border-radius: 6px; }}
.ex {{ margin: 14px 0; padding: 8px 0; border-top: 1px solid #ddd; }} .head {{ color: #555; font-size: 13px; }}
.w {{ padding: 1px 3px; border-radius: 3px; }} .legend span {{ padding: 1px 6px; border-radius: 3px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="q"><b>Query {query["index"]}</b> (label <b>{html.escape(str(query["label"]))}</b>)<br>{query_text}</div>
<p class="legend">Each training word is coloured by its share of the example's influence on the query:
<span style="background:rgba({POSITIVE[0]}, {POSITIVE[1]}, {POSITIVE[2]}, 0.6)">raises its margin</span>
<span style="background:rgba({NEGATIVE[0]}, {NEGATIVE[1]}, {NEGATIVE[2]}, 0.6)">lowers it</span>
(hover a word for its score; the per-token scores of an example sum to its score).</p>
{body}
</body></html>
"""


def write_token_report(config, tokenizer, scores: np.ndarray, picks: list, tokens: np.ndarray, query_text, train_text,
                       scores_name: str) -> None:
    """--html: the page (`page`) and, beside it, the same numbers as JSON (per token and per word)."""
    task = pipeline.get_task(config.dataset_name)
    label = task.label_name
    query = query_text[config.inspect_query]
    examples = []
    for rank, (index, row) in enumerate(zip(picks, tokens)):
        example = train_text[index]
        texts = [example[key] for key in task.keys]
        encoding = tokenizer(*texts, truncation=True, max_length=config.max_seq_length, return_offsets_mapping=True)
        examples.append({
            "title": f"{'most positive' if scores[config.inspect_query, index] >= 0 else 'most negative'} #{rank + 1}",
            "index": index, "label": label(example["label"]), "score": float(scores[config.inspect_query, index]),
            "tokens": encoding.tokens(), "token_scores": row[:len(encoding.tokens())].tolist(),
            "words": words(encoding, texts, row)})
    title = (f"{config.dataset_name}: which words of the top training examples drive query {config.inspect_query} "
             f"({scores_name})")
    query_view = {"index": config.inspect_query, "label": label(query["label"]), "texts": [query[k] for k in task.keys]}
    results.make_output_dir(os.path.dirname(os.path.abspath(config.html)))
    with results.atomic_path(config.html) as tmp, open(tmp, "w") as f:
        f.write(page(title, query_view, examples))
    results.atomic_write_json({"query": query_view, "scores_name": scores_name, "examples": examples},
                                os.path.splitext(config.html)[0] + ".json")
    logger.info("Token-level report: %s (numbers: %s)", config.html, os.path.splitext(config.html)[0] + ".json")


def show_influences(scores: np.ndarray, index: int, queries, train, task_name: str,
                    top_k: int, name: str, prediction: dict | None = None) -> None:
    """Prints query `index` (text, label; with `prediction`, the explorer's entry for the query, the model's
    prediction, its margin and whether it is wrong) and its `top_k` most positively and negatively influential
    training examples under the score set `name`, as the seed README shows them."""
    task = pipeline.get_task(task_name)

    def show(example, score=None):
        label = task.label_name(example["label"])
        lines = [f"  {key}: {example[key]}" for key in task.keys] + [f"  label: {label}"]
        return "\n".join(([f"  score: {score:.4g}"] if score is not None else []) + lines)

    print(f"\nQuery {index}:\n{show(queries[index])}")
    if prediction is not None:
        verdict = {True: ": right", False: ": WRONG"}.get(prediction.get("correct"), "")
        print(f"  prediction: {prediction['prediction']} (margin {prediction['margin']:.3f}{verdict})")
    order = np.argsort(-scores[index], kind="stable")
    for title, picks in (("most positively", order[:top_k]), ("most negatively", order[::-1][:top_k])):
        print(f"\nTop {top_k} {title} influential training examples ({name}):")
        for j in picks:
            print(f"[train {j}]\n{show(train[int(j)], scores[index, j])}")


def show_self_ranking(path: str, k: int, scores_name: str) -> None:
    """Prints the top `k` rows of a self-influence ranking CSV (influence.write_self_ranking)."""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    print(f"\nTop {k} training examples by self-influence ({scores_name}):")
    for rank, index, score, label, *texts in rows[1:k + 1]:
        print(f"[{rank}. train {index}]  self-influence: {float(score):.4g}  label: {label}\n  " + "\n  ".join(texts))


def print_lds_table(table: dict, title: str, reference: str | None, ceiling: dict | None = None) -> None:
    """The LDS table (lds.lds_table); with the noise ceiling, each set's LDS as a fraction of it."""
    print(f"\n{title}")
    width = max(14, *(len(name) + 2 for name in table))
    print(f"{'scores':<{width}}{'LDS':>8}{'± SE (queries)':>16}{'95% CI (masks)':>20}"
          + (f"{f'vs {reference} [95% CI masks]':>32}" if reference else "")
          + (f"{'of ceiling [95% CI]':>24}" if ceiling else ""))
    for name, row in table.items():
        diff = row.get("versus")
        versus = f"{diff['mean']:+.3f} [{diff['ci95_masks'][0]:+.3f}, {diff['ci95_masks'][1]:+.3f}]" if diff else ""
        low, high = row["ci95_masks"]
        line = (f"{name:<{width}}{row['mean']:>8.3f}{row['se_queries']:>16.3f}{f'[{low:.3f}, {high:.3f}]':>20}"
                + (f"{versus:>32}" if reference else ""))
        if ceiling and None not in row["fraction_of_ceiling"].values():
            part, (low, high) = row["fraction_of_ceiling"]["mean"], row["fraction_of_ceiling"]["ci95_masks"]
            line += f"{f'{part:.2f} [{low:.2f}, {high:.2f}]':>24}"
        print(line)
    if ceiling:
        low, high = ceiling["ci95_masks"]
        print(f"{'noise ceiling':<{width}}{ceiling['mean']:>8.3f}{'':>16}{f'[{low:.3f}, {high:.3f}]':>20}  (the "
              f"highest LDS reachable through the noise of {ceiling['num_repeats']} retrains per mask)")


def print_curve(curves: dict, title: str) -> None:
    stability = any("stability" in row for result in curves.values() for row in result["rows"])
    print(f"\n{title}")
    print(f"{'method':<12}{'models':>7}{'groups':>7}{'LDS':>8}{'± sd':>7}{'s/model':>9}"
          + (f"{'Spearman':>10}{'top-10':>8}{'top-1':>7}  (vs --stability_dir)" if stability else ""))
    for method, result in curves.items():
        for row in result["rows"]:
            sd = f"{row['lds_sd']:.3f}" if row["lds_sd"] is not None else "-"
            line = (f"{method:<12}{row['models']:>7}{row['groups']:>7}{row['lds_mean']:>8.3f}{sd:>7}"
                    f"{row['seconds_per_model']:>9.0f}")
            if "stability" in row:
                st = row["stability"]
                line += f"{st['spearman']:>10.3f}{st['top10_overlap']:>8.1f}{st['top1_same']:>7.2f}"
            print(line)


def print_detection_table(metrics: dict, inspected: tuple, fixed: dict | None = None) -> None:
    """ROC AUC, AP and found@f of each ranking of the training set (detection.py), and with the fix-and-retrain
    sweep (cleaning.py) the accuracy after dropping each ranking's top fractions."""
    found = [f"found@{round(100 * f)}%" for f in inspected]
    columns = [*found, *next(iter(fixed["rankings"].values()))] if fixed else found
    width = max(12, *(len(name) + 2 for name in metrics))
    print(f"\n{'ranking':<{width}}{'ROC AUC':>9}{'AP':>8}" + "".join(f"{c:>12}" for c in columns))
    for name, row in metrics.items():
        print(f"{name:<{width}}{row['roc_auc']:>9.3f}{row['average_precision']:>8.3f}"
              + "".join(f"{row[c]:>12.3f}" if c in row else f"{'-':>12}" for c in columns))
    if fixed:
        print(f"Accuracy on {fixed['num_judged']} judged validation examples: noisy model {fixed['noisy']:.3f}, "
              f"clean-label model {fixed['clean']:.3f}")
