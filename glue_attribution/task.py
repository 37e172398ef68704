"""The kronfluence `Task` for GLUE: what loss the factors approximate and what the scores measure."""


import torch
import torch.nn.functional as F
from kronfluence.task import Task
from torch import nn

from .pipeline import margins

BATCH_TYPE = dict[str, torch.Tensor]


def _model_inputs(batch: BATCH_TYPE) -> BATCH_TYPE:
    return {k: v for k, v in batch.items() if k != "labels"}


class GlueTask(Task):
    """Classification (any number of labels) or regression (one output, STS-B).

    Scores follow kronfluence's convention: a positive score means the training example pushes the query's margin
    up (it supports the correct prediction), so removing it lowers the margin. LDS and the counterfactual use this
    sign directly, as the seed does.

    Args:
        tracked_modules: Names of the modules whose parameters influence is computed for (None: every `nn.Linear`).
    """

    measurement = "margin"  # what compute_measurement returns: named in every factor and score signature

    def __init__(self, tracked_modules: list[str] | None = None) -> None:
        super().__init__()
        self.tracked_modules = tracked_modules

    def compute_train_loss(self, batch: BATCH_TYPE, model: nn.Module, sample: bool = False) -> torch.Tensor:
        """Summed training loss; with `sample=True` (true Fisher) labels are drawn from the model's predictive
        distribution: a class from the softmax, or for regression a target from N(prediction, 1/2), the Gaussian
        whose negative log-likelihood is the squared error."""
        logits = model(**_model_inputs(batch)).logits
        if logits.shape[-1] == 1:
            predictions = logits.squeeze(-1)
            with torch.no_grad():
                noise = torch.randn_like(predictions) * 0.5**0.5
                targets = predictions + noise if sample else batch["labels"].to(logits.dtype)
            return F.mse_loss(predictions, targets, reduction="sum")
        if not sample:
            return F.cross_entropy(logits, batch["labels"], reduction="sum")
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(logits.float(), dim=-1), num_samples=1).flatten()
        return F.cross_entropy(logits, sampled, reduction="sum")

    def compute_measurement(self, batch: BATCH_TYPE, model: nn.Module) -> torch.Tensor:
        """Negative summed margin (correct logit minus logsumexp of the others; the prediction for regression).

        Copied in spirit from TRAK's `modelout_functions` via the kronfluence GLUE example, which returns the same
        negated margin: kronfluence treats the measurement like a loss, so the negation makes positive scores mean
        "raises the margin".
        """
        logits = model(**_model_inputs(batch)).logits
        return -margins(logits, batch["labels"]).sum()

    def get_influence_tracked_modules(self) -> list[str] | None:
        return self.tracked_modules

    def get_attention_mask(self, batch: BATCH_TYPE) -> torch.Tensor:
        return batch["attention_mask"]
