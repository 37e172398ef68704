"""fast_factors must reproduce kronfluence's stock Lambda matrices and self-influence scores (float64, CPU)."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.module.tracked_module import ModuleMode, TrackedModule
from kronfluence.module.utils import set_gradient_scale
from kronfluence.task import Task
from kronfluence.utils.dataset import DataLoaderKwargs
from torch import nn

from glue_attribution.fast_factors import install_fast_trackers

F64 = torch.float64
# Batches of 4: short ones take the token path, the long ones (padded to 40) fall back to the stock computation.
LENGTHS = [5, 9, 3, 12, 7, 4, 11, 6, 40, 8, 2, 10, 6, 3, 9, 5, 12, 4, 7, 11, 30, 3, 8, 6]


class TinyTask(Task):
    def _logits(self, batch, model):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return getattr(out, "logits", out)

    def compute_train_loss(self, batch, model, sample=False):
        logits = self._logits(batch, model)
        if sample:
            with torch.no_grad():
                labels = torch.multinomial(logits.softmax(-1), num_samples=1).flatten()
        else:
            labels = batch["labels"]
        return F.cross_entropy(logits, labels, reduction="sum")

    def compute_measurement(self, batch, model):
        return self._logits(batch, model).gather(1, batch["labels"][:, None]).sum()

    def get_attention_mask(self, batch):
        return batch["attention_mask"]


class TinyNoBias(nn.Module):
    """Bias-free Linears; `shared` calls lin1 twice per forward. The last position (padding for short sequences)
    leaks into the output, so padded tokens carry gradient: Lambda must not be masked, as in kronfluence."""

    def __init__(self, shared=False):
        super().__init__()
        self.shared, self.emb = shared, nn.Embedding(100, 16)
        self.lin1, self.lin2 = nn.Linear(16, 16, bias=False), nn.Linear(16, 16, bias=False)
        self.head = nn.Linear(16, 2, bias=False)

    def forward(self, input_ids, attention_mask):
        h = torch.tanh(self.lin1(self.emb(input_ids)))
        if self.shared:
            h = torch.tanh(self.lin1(h))
        h = torch.tanh(self.lin2(h))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1) + 0.1 * h[:, -1])


def make_model(kind):
    torch.manual_seed(0)
    if kind == "bert":
        config = transformers.BertConfig(
            vocab_size=100,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            num_labels=2,
        )
        model = transformers.BertForSequenceClassification._from_config(config, attn_implementation="eager")
    else:
        model = TinyNoBias(shared=kind == "shared")
    return model.double()


def make_dataset():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(1, 100, (n,), generator=g), "labels": torch.tensor(n % 2)} for n in LENGTHS]


def collate(examples):
    ids = nn.utils.rnn.pad_sequence([e["input_ids"] for e in examples], batch_first=True)
    return {
        "input_ids": ids,
        "attention_mask": (ids != 0).long(),
        "labels": torch.stack([e["labels"] for e in examples]),
    }


def run(analyzer, name, data, factor_args, score_args):
    """Fits all factors and self-scores (with the factors of this same run); returns (Lambda factors, self-scores)."""
    kwargs = {"dataloader_kwargs": DataLoaderKwargs(collate_fn=collate), "overwrite_output_dir": True}
    torch.manual_seed(2)  # sampled Fisher labels: identical draws for the stock and the fast run
    analyzer.fit_all_factors(name, data, per_device_batch_size=4, factor_args=factor_args, **kwargs)
    analyzer.compute_self_scores(name, name, data, per_device_train_batch_size=4, score_args=score_args, **kwargs)
    return analyzer.load_lambda_matrices(name) or {}, analyzer.load_self_scores(name)["all_modules"]


def assert_close(fast, stock, rtol=1e-10):
    assert fast.shape == stock.shape and fast.dtype == stock.dtype
    assert (fast - stock).abs().max() <= rtol * stock.abs().max(), (fast - stock).abs().max() / stock.abs().max()


@pytest.mark.parametrize(
    "kind, strategy, scale, expected_count",
    [
        ("bert", "ekfac", 0.5, 14),
        ("bert", "diagonal", 1.0, 14),
        ("nobias", "ekfac", 1.0, 3),
        ("nobias", "diagonal", 0.5, 3),
        ("nobias", "kfac", 1.0, 3),  # self-scores only (K-FAC has no Lambda)
        ("shared", "ekfac", 1.0, 3),  # has_shared_parameters: stock trackers throughout
    ],
)
def test_matches_stock(tmp_path, kind, strategy, scale, expected_count):
    shared = kind == "shared"
    factor_args = FactorArguments(
        strategy=strategy,
        has_shared_parameters=shared,
        use_iterative_lambda_aggregation=kind == "nobias",
        activation_covariance_dtype=F64,
        gradient_covariance_dtype=F64,
        eigendecomposition_dtype=F64,
        lambda_dtype=F64,
        per_sample_gradient_dtype=F64,
    )
    score_args = ScoreArguments(per_sample_gradient_dtype=F64, precondition_dtype=F64, score_dtype=F64)
    model = prepare_model(make_model(kind), TinyTask())
    set_gradient_scale(model, scale)  # what fp16 AMP's GradScaler sets; must scale G before squaring
    analyzer = Analyzer("fast", model=model, task=TinyTask(), cpu=True, disable_tqdm=True, output_dir=str(tmp_path))
    data = make_dataset()

    stock_lambda, stock_scores = run(analyzer, "stock", data, factor_args, score_args)
    assert install_fast_trackers(model) == expected_count
    fast_lambda, fast_scores = run(analyzer, "fast", data, factor_args, score_args)

    assert_close(fast_scores, stock_scores)
    assert fast_lambda.keys() == stock_lambda.keys()
    for factor_name, per_module in stock_lambda.items():
        for name, stock in per_module.items():
            assert_close(fast_lambda[factor_name][name], stock)

    # Per module, how many of the 6 batches took the token path: all when T = 1 (pooler, head) or for the diagonal
    # strategy (nothing to rotate); for the sequence layers only the short batches (padded length <= 12).
    trackers = [m._trackers for m in model.modules() if isinstance(m, TrackedModule)]
    for mode, ran in [(ModuleMode.LAMBDA, strategy != "kfac"), (ModuleMode.SELF_SCORE, True)]:
        counts = [t[mode].num_fast_batches for t in trackers]
        if shared or not ran:
            assert max(counts) == 0
        elif strategy == "diagonal":
            assert min(counts) == len(LENGTHS) // 4
        else:
            assert 0 < min(counts) < max(counts) == len(LENGTHS) // 4


def test_install_before_fitting_only():
    model = prepare_model(make_model("nobias"), TinyTask())
    next(m for m in model.modules() if isinstance(m, TrackedModule)).set_mode(ModuleMode.LAMBDA)
    with pytest.raises(RuntimeError):
        install_fast_trackers(model)


def test_other_kronfluence_version_keeps_the_stock_trackers(monkeypatch):
    import kronfluence

    monkeypatch.setattr(kronfluence, "__version__", "9.9.9")
    model = prepare_model(make_model("nobias"), TinyTask())
    with pytest.warns(UserWarning, match="written against kronfluence 1.0.1, found 9.9.9"):
        assert install_fast_trackers(model) == 0
    tracked = next(m for m in model.modules() if isinstance(m, TrackedModule))
    assert type(tracked._trackers[ModuleMode.LAMBDA]).__module__.startswith("kronfluence.")
