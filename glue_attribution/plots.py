"""The figures: LDS bars, LDS against ensemble size, counterfactual flips against k, mislabeled data found against
the fraction inspected. Each is drawn from a results JSON's numbers, through one helper (`figure`) that uses the
headless Agg backend and writes the file under a temporary name, then renames it.
"""

import os
from contextlib import contextmanager

import numpy as np

from . import results
from .failpoints import failpoint


@contextmanager
def figure(path: str, figsize: tuple, ncols: int = 1):
    """Yields the axes of a new figure (`ncols` side by side: an array of them); on leaving, lays it out and
    writes it to `path` (the extension picks the format) atomically: a figure that exists is complete."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, ncols, figsize=figsize)
    try:
        yield ax
        fig.tight_layout()
        results.make_output_dir(os.path.dirname(os.path.abspath(path)))
        with results.atomic_path(path, os.path.splitext(path)[1]) as tmp:
            failpoint("drawing")
            fig.savefig(tmp, dpi=150)
    finally:
        plt.close(fig)


def lds_bars(table: dict, path: str, title: str, baselines: tuple) -> None:
    """Bars of LDS with the mask-bootstrap interval as error bars (the wider, more honest of the two)."""
    names = list(table)
    means = np.array([table[n]["mean"] for n in names])
    intervals = np.array([table[n]["ci95_masks"] for n in names])
    errors = np.abs(np.stack([means - intervals[:, 0], intervals[:, 1] - means]))
    with figure(path, (1.1 * len(names) + 2, 3.5)) as ax:
        ax.bar(names, means, yerr=errors, capsize=4, color=["0.6" if n in baselines else "C0" for n in names])
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_ylabel("LDS (Spearman)")
        ax.set_title(title, fontsize=9)


def ensemble_curve(curves: dict, path: str, title: str) -> None:
    """LDS against the number of ensembled models, one line per method, ± sd over groups of members."""
    from matplotlib.ticker import ScalarFormatter

    with figure(path, (4.5, 3.5)) as ax:
        for method, result in curves.items():
            rows = result["rows"]
            ax.errorbar([r["models"] for r in rows], [r["lds_mean"] for r in rows],
                        yerr=[r["lds_sd"] or 0 for r in rows], marker="o", capsize=3, label=method)
        ax.set_xscale("log", base=2)
        ax.set_xticks([r["models"] for r in max(curves.values(), key=lambda r: len(r["rows"]))["rows"]])
        ax.get_xaxis().set_major_formatter(ScalarFormatter())
        ax.set_xlabel("fine-tuned models in the ensemble")
        ax.set_ylabel("LDS (Spearman)")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)


def flip_fractions(counterfactual: dict, path: str) -> None:
    """Fraction of queries flipped against k, one line per method, with its 95% interval over queries as error bars
    (counterfactual_results.json). The methods are set slightly apart at each k so that equal values stay visible."""
    ks = np.array(counterfactual["remove_intervals"], dtype=float)
    methods, intervals = counterfactual["flip_fraction"], counterfactual.get("flip_fraction_ci95", {})
    step = 0.015 * (ks[-1] - ks[0] if len(ks) > 1 else ks[0])
    with figure(path, (7.2, 3.6)) as ax:
        for i, (method, fractions) in enumerate(methods.items()):
            x = ks + (i - (len(methods) - 1) / 2) * step
            low, high = np.array(intervals.get(method, [[f, f] for f in fractions])).T  # none in older results
            ax.errorbar(x, fractions, yerr=[np.subtract(fractions, low), np.subtract(high, fractions)],
                        marker="os^vDP"[i % 6], capsize=3, label=method, color=f"C{i}")
        ax.set_xticks(ks, [str(int(k)) for k in ks])
        ax.set(xlabel="training examples removed (k)", ylabel="fraction of queries flipped", ylim=(-0.02, 1.02),
               title=f"{counterfactual['task']}: {len(counterfactual['queries'])} queries, "
                     f"{counterfactual['num_train']} training examples; 95% intervals over queries")
        ax.title.set_fontsize(9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))


def found_curves(curves: dict, path: str, title: str, baselines: tuple, fixed: dict | None = None) -> None:
    """Fraction of the flipped labels found against the fraction of the training set inspected, per ranking; with
    the fix-and-retrain sweep, a second panel of the accuracy after dropping each ranking's top fractions, between
    the noisy and clean-label models."""
    with figure(path, (11, 4.6) if fixed else (5.2, 3.8), ncols=2 if fixed else 1) as axes:
        ax, right = axes if fixed else (axes, None)
        colors = {name: f"C{i % 10}" for i, name in enumerate(curves)}
        styles = {name: "--" if name in baselines else ":" if i >= 10 else "-" for i, name in enumerate(curves)}
        for name, curve in curves.items():
            inspected = np.arange(1, len(curve) + 1) / len(curve)
            ax.plot(inspected, curve, label=name, linestyle=styles[name], color=colors[name])
        ax.set(xlabel="fraction of the training set inspected", ylabel="fraction of flipped labels found",
               xlim=(0, 1), ylim=(0, 1.01), title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        if fixed:
            names = list(fixed["rankings"])
            keys = list(fixed["rankings"][names[0]])
            width = 0.8 / len(keys)
            for k, key in enumerate(keys):
                right.bar(np.arange(len(names)) + (k - (len(keys) - 1) / 2) * width,
                          [fixed["rankings"][n][key] for n in names], width, label=f"top {key[6:]} dropped",
                          color=f"C{k}", alpha=0.8)
            for model, style in (("noisy", "--"), ("clean", "-")):
                right.axhline(fixed[model], color="k", linestyle=style, linewidth=1,
                              label=f"{model}-label model {fixed[model]:.3f}")
            values = [fixed["rankings"][n][key] for n in names for key in keys] + [fixed["noisy"], fixed["clean"]]
            right.set_ylim(min(values) - 0.02, max(values) + 0.02)
            right.set_xticks(np.arange(len(names)), names, rotation=60, ha="right", fontsize=7)
            right.set(ylabel=f"accuracy on {fixed['num_judged']} judged validation examples",
                      title="fix and retrain")
            right.legend(fontsize=7)
            right.grid(alpha=0.3, axis="y")
