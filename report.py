"""Token-level influence as a page: which words of a training example carry its influence on a query.

The scores come from kronfluence's per-token pairwise scores (analyze.py --html); this module only groups word
pieces back into words and draws them, coloured like Captum's `visualize_text` (green raises the query's margin, red
lowers it, the colour's strength relative to the example's largest word).
"""

import html

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
