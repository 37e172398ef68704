"""TRAK (Park et al., 2023) through MadryLab's `traker`: the peer method of the LDS table, computed on the same
checkpoint, training examples and queries as the influence scores and returned in the same orientation and sign
(queries x train; positive: the training example raises the query's margin).

What is featurised: the weights and biases of the tracked nn.Linear modules (all of them by default, the parameters
EK-FAC's factors cover), not the embeddings; their per-example gradients of the margin (task.py's measurement) are
projected to `proj_dim` dimensions by a Gaussian random matrix (as traker's BasicProjector, generated block by block
on --device so that it fits memory). `publish_trak` computes and publishes one checkpoint's TRAK score set as
influence.py publishes kronfluence's (same splits, same order, same layout).
"""

import importlib.metadata
import logging
import os
import time

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from trak import TRAKer
from trak.gradient_computers import FunctionalGradientComputer
from trak.modelout_functions import AbstractModelOutput
from trak.projectors import AbstractProjector, ProjectionType

from . import pipeline, progress, results
from .errors import GlueError
from .scoring import publish_scores, sorted_splits, tracked_modules

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class Logits(nn.Module):
    """A Hugging Face classifier called with positional input tensors, returning logits (what traker expects). The
    padding mask goes in additive 4-D form: from the 2-D one, transformers checks whether anything is padded, and
    that data-dependent branch cannot run under traker's vmap."""

    def __init__(self, model: nn.Module, keys: tuple) -> None:
        super().__init__()
        self.model, self.keys = model, keys

    def forward(self, *inputs):
        inputs = dict(zip(self.keys, inputs))
        keep = inputs["attention_mask"][:, None, None, :]
        dtype = self.model.dtype
        inputs["attention_mask"] = (1 - keep.to(dtype)) * torch.finfo(dtype).min
        return self.model(**inputs).logits


class Margin(AbstractModelOutput):
    """The model output TRAK attributes: the margin of the correct class (the prediction for regression), as in
    task.py; its out-to-loss term is 1 - p(correct) (1 for squared error)."""

    def __init__(self, regression: bool) -> None:
        super().__init__()
        self.regression = regression

    def get_output(self, model, weights, buffers, *example):
        *inputs, label = (t.unsqueeze(0) for t in example)
        logits = torch.func.functional_call(model, (weights, buffers), args=tuple(inputs))
        return pipeline.margins(logits, label).sum()

    def get_out_to_loss_grad(self, model, weights, buffers, batch):
        *inputs, labels = batch
        logits = torch.func.functional_call(model, (weights, buffers), args=tuple(inputs))
        if self.regression:
            return torch.ones(len(labels), 1, dtype=logits.dtype)
        return (1 - logits.softmax(-1)[torch.arange(len(labels)), labels]).detach().unsqueeze(-1)


class FeaturisedGradients(FunctionalGradientComputer):
    """traker's per-example gradients, taken only with respect to the featurised parameters (`grad_wrt`): the rest
    are passed as constants, so no per-example gradient of the embeddings (47 MB an example) is ever formed."""

    def load_model_params(self, model) -> None:
        params = dict(model.named_parameters())
        featurised = set(getattr(self, "grad_wrt", None) or params)  # traker sets grad_wrt after a first load
        self.func_weights = {k: v.detach() for k, v in params.items() if k in featurised}
        self.func_buffers = {**{k: v.detach() for k, v in params.items() if k not in featurised},
                             **dict(model.named_buffers())}


class Projector(AbstractProjector):
    """A Gaussian JL projection (i.i.d. N(0, 1) entries, as traker's BasicProjector), generated in blocks of rows,
    parameter tensor by parameter tensor in a fixed order, from one seeded generator: the same matrix for every
    batch, at most ROWS_BYTES of it in memory, and no flattened copy of the gradients."""

    ROWS_BYTES = 1 << 30

    def __init__(self, grad_dim: int, proj_dim: int, seed: int, device="cpu") -> None:
        super().__init__(grad_dim, proj_dim, seed, ProjectionType.normal, device)

    def project(self, grads: dict, model_id: int) -> torch.Tensor:
        generator = torch.Generator(device=self.device).manual_seed(self.seed + 100_003 * model_id)
        sketch = None
        for name in sorted(grads):
            flat = grads[name].flatten(1)
            block = max(1, self.ROWS_BYTES // (flat.element_size() * self.proj_dim))
            for start in range(0, flat.shape[1], block):
                rows = torch.empty(min(block, flat.shape[1] - start), self.proj_dim, dtype=flat.dtype,
                                   device=self.device).normal_(generator=generator)
                part = flat[:, start:start + len(rows)] @ rows
                sketch = part if sketch is None else sketch.add_(part)
        return sketch

    def free_memory(self) -> None:
        pass


def featurised_parameters(model: nn.Module, modules: list | None) -> list:
    """Names (as in `Logits(model)`) of the weights and biases of `modules` (default: every nn.Linear)."""
    chosen = modules or [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    return [f"model.{name}" for name, _ in model.named_parameters() if name.rsplit(".", 1)[0] in set(chosen)]


def batches(dataset, collate, keys: tuple, batch_size: int, desc: str):
    """Padded batches as traker takes them: tuples of the model's input tensors (`keys`), then the labels."""
    for start in tqdm(range(0, len(dataset), batch_size), desc=desc):
        batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
        yield (*(batch[k] for k in keys), batch["labels"])


def compute(model: nn.Module, train_dataset, query_dataset, collate, regression: bool, modules: list | None,
            proj_dim: int, batch_sizes: tuple, work_dir: str, seed: int = 0, device: str = "cpu",
            verbose: bool = False) -> np.ndarray:
    """TRAK scores (queries x train, in the datasets' order) of one model, with (train, query) `batch_sizes`;
    traker's files go to `work_dir`."""
    model.set_attn_implementation("eager")  # vmap has no batching rule for SDPA's kernels: it would loop
    model = model.to(device).eval()
    keys = tuple(k for k in INPUTS if k in train_dataset.column_names)
    wrapped = Logits(model, keys)
    params = featurised_parameters(model, modules)
    grad_dim = sum(p.numel() for name, p in wrapped.named_parameters() if name in set(params))
    projector = Projector(grad_dim=grad_dim, proj_dim=proj_dim, seed=seed, device=device)
    traker = TRAKer(model=wrapped, task=Margin(regression), train_set_size=len(train_dataset), save_dir=work_dir,
                    device=device, gradient_computer=FeaturisedGradients, projector=projector,
                    use_half_precision=False, grad_wrt=params,
                    logging_level=logging.INFO if verbose else logging.WARNING)
    state = wrapped.state_dict()
    traker.load_checkpoint(state, model_id=0)
    for batch in batches(train_dataset, collate, keys, batch_sizes[0], "TRAK features (train)"):
        traker.featurize(batch=batch, num_samples=len(batch[0]))
    traker.finalize_features()
    traker.start_scoring_checkpoint(exp_name="queries", checkpoint=state, model_id=0, num_targets=len(query_dataset))
    for batch in batches(query_dataset, collate, keys, batch_sizes[1], "TRAK features (queries)"):
        traker.score(batch=batch, num_samples=len(batch[0]))
    return np.asarray(traker.finalize_scores(exp_name="queries"), dtype=np.float32).T.copy()


def signature(config, provenance: dict) -> dict:
    """Everything that changes TRAK scores."""
    return {**{k: provenance[k] for k in ("checkpoint_sha256", "dataset_name", "num_train", "train_data",
                                          "max_seq_length", "num_query", "query_data")},
            "pad_to_max_length": config.pad_to_max_length, "tracked_modules": config.tracked_modules,
            "seed": config.seed,
            "trak": {"proj_dim": config.proj_dim, "proj_type": "normal", "featurised": "nn.Linear weights and biases",
                     "traker": importlib.metadata.version("traker")}}


def publish_trak(config, model, tokenizer, texts: tuple, root: str, public: str, meta: dict) -> None:
    """TRAK scores of one checkpoint, computed in the private folder `root` on influence.py's length-sorted splits,
    written in dataset order in kronfluence's layout (`all_modules`), then published as the score set `public`."""
    if torch.distributed.is_initialized():
        raise GlueError("--factor_strategy trak runs in one process; launch it without torchrun")
    (train_dataset, query_dataset), (train_order, query_order) = sorted_splits(config, tokenizer, *texts)
    entries = len(train_dataset) * len(query_dataset)
    results.check_free_space(root, 2 * entries * 4, "the scores")  # float32, and their copy in dataset order
    progress.stage("computing TRAK scores", root)
    start = time.time()
    scores = compute(
        model, train_dataset, query_dataset, pipeline.collator(tokenizer),
        pipeline.get_task(config.dataset_name).is_regression, tracked_modules(model, config.tracked_modules),
        config.proj_dim, (config.train_batch_size, config.query_batch_size), os.path.join(root, "traker"),
        seed=config.seed, device=config.device, verbose=config.verbose)
    meta["scores_seconds"] = time.time() - start
    work = os.path.join(root, f"scores_{meta['scores_name']}")
    os.makedirs(work)
    save_file({"all_modules": torch.from_numpy(scores)}, os.path.join(work, "pairwise_scores.safetensors"))
    publish_scores(work, root, public, meta, (train_order, query_order))
