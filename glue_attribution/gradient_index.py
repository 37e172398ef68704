"""A gradient index: every training example's gradient computed once, compressed and preconditioned, so that the
influence of any query set, new texts included, is one matrix product against the store.

Per tracked `nn.Linear` the per-example gradient is a sum of per-token outer products, G = sum_t g_t a_t^T (bias as a
trailing input of ones). It is compressed from the token factors, never materialised (as in fast_factors.py):

    G~ = B_out^T G B_in = (g B_out)^T (a B_in)        (k_out x k_in per module)

- `eigen` projection: B_in, B_out are the top-k eigenvectors of the fitted K-FAC covariances (the factors of the
  `kfac` strategy, fitted on all or the first N training examples). EK-FAC is diagonal in that basis, so truncating
  there keeps the preconditioner exact on the kept block; at k = the layer's width the index is exact EK-FAC / K-FAC.
- `random` projection: B = a Gaussian matrix (the identity once k reaches the width); the covariances of the
  projected tokens are accumulated in the same pass, and the stored block is rotated into their eigenbasis after it.

The preconditioner comes from the store: EK-FAC's Lambda is the mean of G~^2 over the indexed examples (the
empirical Fisher: the training labels), K-FAC's the outer product of the covariances' eigenvalues; 'auto' damping is
0.1 x the mean of the untruncated Lambda, known from each example's full gradient norm (computed from the token
factors too). The index stores P(G~) = G~ / (Lambda + damping) for every example, so that

    score(query, train) = sum over modules <G~_query, P(G~_train)>     (kronfluence's pairwise score)
    self-influence(train) = sum over modules <G~_train, P(G~_train)>

The build is cut into chunks of consecutive training examples, each published once complete: a killed build resumes
after its last chunk, and `num_shards` processes (a SLURM array, torchrun ranks) build disjoint chunks that merge into
the same bytes as one process.
"""

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import progress, results
from .errors import GlueError, ResultDamaged, ResultMissing
from .failpoints import failpoint

logger = logging.getLogger(__name__)
INDEX_META = "glue_index.json"
INDEX_FILE = "gradient_index.safetensors"
PROJECTIONS = ("eigen", "random")
PRECONDITIONERS = ("ekfac", "kfac", "identity")


@dataclass
class IndexConfig:
    """How the index compresses and preconditions the training gradients.

    Args:
        rank: k, the eigenvectors (or random directions) kept per side of each module; None keeps all (exact).
        projection: "eigen" (the K-FAC factors' top-k eigenvectors) or "random" (Gaussian, seeded by `seed`).
        preconditioner: "ekfac", "kfac" or "identity" (a plain dot product in the projected space).
        damping_factor: added to Lambda before inverting; None: 0.1 x the mean of the untruncated Lambda.
        normalize: divide each training example's scores by the square root of its self-influence (RelatIF's
            normalisation, TrackStar's unit gradients): rankings stop being dominated by a few large gradients.
        float64: compute (and compare with exact strategies) in float64.
        store_dtype: "float32" or "float16" for the stored rows (half the disk and memory; scores in float32).
        batch_size: training examples per forward/backward pass.
        chunk_size: training examples per resumable chunk.
        seed: seeds the random projection.
    """

    rank: int | None = 16
    projection: str = "eigen"
    preconditioner: str = "ekfac"
    damping_factor: float | None = 1e-8
    normalize: bool = False
    float64: bool = False
    store_dtype: str = "float32"
    batch_size: int = 32
    chunk_size: int = 2048
    seed: int = 0

    def __post_init__(self):
        if self.projection not in PROJECTIONS:
            raise GlueError(f"index projection '{self.projection}': choose one of {', '.join(PROJECTIONS)}")
        if self.preconditioner not in PRECONDITIONERS:
            raise GlueError(f"index preconditioner '{self.preconditioner}': choose one of "
                            f"{', '.join(PRECONDITIONERS)}")
        if self.rank is not None and self.rank < 1:
            raise GlueError(f"index rank {self.rank}: pass a positive k (or none for the full width)")
        if self.store_dtype not in ("float32", "float16"):
            raise GlueError(f"index store dtype '{self.store_dtype}': choose float32 or float16")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float64 if self.float64 else torch.float32

    def signature(self) -> dict:
        """What changes the stored values (not how the work is cut into batches, chunks and shards)."""
        return {k: v for k, v in asdict(self).items() if k not in ("normalize", "batch_size", "chunk_size")}


# ----------------------------------------------------------------------------------------------------------------------
# Projections and the per-example compressed gradients

def linear_modules(model: nn.Module, names: list | None = None) -> dict:
    """{name: nn.Linear} of the tracked modules (all of them when `names` is None), in the model's order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and (names is None or n in names)}


def widths(module: nn.Linear) -> tuple:
    """(d_in, d_out) of the per-example gradient, the bias counted as an input column."""
    return module.in_features + (module.bias is not None), module.out_features


def eigen_bases(modules: dict, factors_dir: str, rank: int | None, dtype) -> dict:
    """{name: (B_in, B_out, eigenvalues_in, eigenvalues_out, mean eigenvalue product)}: the top-`rank` eigenvectors
    of each module's K-FAC covariances (kronfluence's eigendecomposition files in `factors_dir`), largest eigenvalue
    first; the mean product of all eigenvalues is K-FAC's 'auto' damping scale."""
    factors = {kind: load_file(os.path.join(factors_dir, f"{kind}.safetensors"))
               for kind in ("activation_eigenvectors", "activation_eigenvalues", "gradient_eigenvectors",
                            "gradient_eigenvalues")}
    bases = {}
    for name in modules:
        if name not in factors["activation_eigenvectors"]:
            raise GlueError(f"the factors in {factors_dir} have no module '{name}'; refit them for this model")
        sides = []
        for side in ("activation", "gradient"):
            values, vectors = factors[f"{side}_eigenvalues"][name], factors[f"{side}_eigenvectors"][name]
            keep = torch.arange(len(values) - 1, max(len(values) - (rank or len(values)), 0) - 1, -1)
            sides.append((vectors[:, keep].to(dtype), values[keep].to(dtype), float(values.double().mean())))
        bases[name] = (sides[0][0], sides[1][0], sides[0][1], sides[1][1], sides[0][2] * sides[1][2])
    return bases


def random_bases(modules: dict, rank: int | None, seed: int, dtype) -> dict:
    """{name: (B_in, B_out, None, None, None)}: Gaussian projections with unit-variance outputs, seeded per module; the
    identity on a side whose width is at most `rank` (projecting there would only mix the coordinates)."""
    bases = {}
    for i, (name, module) in enumerate(modules.items()):
        sides = []
        for j, width in enumerate(widths(module)):
            if rank is None or rank >= width:
                sides.append(torch.eye(width, dtype=dtype))
            else:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + 2 * i + j)
                sides.append(torch.randn(width, rank, generator=generator, dtype=torch.float64).to(dtype)
                             / math.sqrt(rank))
        bases[name] = (*sides, None, None, None)
    return bases


class Collector:
    """Hooks that turn one backward pass into each example's compressed gradients, from the token factors.

    After `loss.backward()` on a summed loss, `rows()` is (batch, sum of k_out * k_in) and `norms()` the squared
    Frobenius norm of each example's untruncated gradient per module (batch, modules; zeros without `norms`). With
    `covariances`, the projected token covariances (padding masked, as kronfluence's) are accumulated across
    batches.
    """

    def __init__(self, model: nn.Module, modules: dict, bases: dict, dtype, covariances: bool = False,
                 norms: bool = True):
        self.modules, self.bases, self.dtype, self.with_norms = modules, bases, dtype, norms
        self.attention_mask = None
        self._rows, self._norms, self._inputs = {}, {}, {}
        # Per module: projected A and S sums, tokens counted, and the untruncated traces of A and S (K-FAC's 'auto').
        self.covariances = {n: [0, 0, 0, 0, 0] for n in modules} if covariances else None
        self._handles = [m.register_forward_hook(self._forward(n)) for n, m in modules.items()]
        # Only gradients w.r.t. layer outputs are needed: keep the weights' own gradients from being computed.
        for p in model.parameters():
            p.requires_grad_(False)
        self._handles.append(model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_()))

    def close(self):
        for handle in self._handles:
            handle.remove()

    def _forward(self, name):
        def hook(module, inputs, output):
            self._inputs[name] = inputs[0].detach()
            output.register_hook(lambda grad: self._backward(name, module, grad.detach()))
        return hook

    @torch.no_grad()
    def _backward(self, name, module, output_gradient):
        a, g = self._inputs.pop(name).to(self.dtype), output_gradient.to(self.dtype)
        if a.dim() == 2:  # pooler, classifier: one vector per example
            a, g = a[:, None], g[:, None]
        mask = None
        if self.attention_mask is not None and a.size(1) == self.attention_mask.size(1) and a.size(1) > 1:
            mask = self.attention_mask.to(self.dtype)[..., None]
        if module.bias is not None:
            a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
        if mask is not None:  # padding: g is 0 there already; masked like kronfluence's activation covariance
            a = a * mask
        b_in, b_out = self.bases[name][:2]
        a_p, g_p = a @ b_in, g @ b_out
        self._rows[name] = torch.bmm(g_p.transpose(1, 2), a_p).flatten(1)
        if self.with_norms:  # T^2 (d_in + d_out) per example: only 'auto' damping needs them
            self._norms[name] = (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum(dim=(1, 2))
        else:
            self._norms[name] = a.new_zeros(a.size(0))
        if self.covariances is not None:
            c = self.covariances[name]
            a_p, g_p = a_p.flatten(0, 1), g_p.flatten(0, 1)
            c[0] = c[0] + a_p.T @ a_p
            c[1] = c[1] + g_p.T @ g_p
            c[2] += int(mask.sum()) if mask is not None else a.size(0)
            c[3] += float(a.square().sum())
            c[4] += float(g.square().sum())

    def rows(self) -> torch.Tensor:
        return torch.cat([self._rows.pop(n) for n in self.modules], dim=1)

    def norms(self) -> torch.Tensor:
        return torch.stack([self._norms.pop(n) for n in self.modules], dim=1)


def collect(model: nn.Module, collector: Collector, dataset, collate, loss_fn, batch_size: int, desc: str,
            disable_tqdm: bool = False) -> tuple:
    """(rows, norms) of every example of `dataset`, in its order; batches are formed longest first (tight padding)
    and put back. `loss_fn(batch, model)` is summed over the batch: the task's training loss or measurement."""
    from tqdm.auto import tqdm

    lengths = np.array([len(ids) for ids in dataset["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    device = next(model.parameters()).device
    rows, norms = [], []
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", disable=disable_tqdm):
        picks = order[start:start + batch_size].tolist()
        batch = {k: v.to(device) for k, v in collate([dataset[i] for i in picks]).items()}
        collector.attention_mask = batch.get("attention_mask")
        loss_fn(batch, model).backward()
        rows.append(collector.rows())
        norms.append(collector.norms())
    inverse = torch.from_numpy(np.argsort(order))
    return torch.cat(rows)[inverse], torch.cat(norms)[inverse]


def block_sizes(bases: dict) -> list:
    return [b[0].shape[1] * b[1].shape[1] for b in bases.values()]


# ----------------------------------------------------------------------------------------------------------------------
# Building: chunks, then one merge that fits the preconditioner and writes the store

def _chunk_path(work: str, chunk: int) -> str:
    return os.path.join(work, f"chunk_{chunk:05d}.safetensors")


def _chunk_done(work: str, chunk: int) -> bool:
    """A chunk is done when its file and its sha256 record exist and agree (a damaged chunk is redone)."""
    path, record = _chunk_path(work, chunk), _chunk_path(work, chunk) + ".sha256"
    if not (os.path.isfile(path) and os.path.isfile(record)):
        return False
    with open(record) as f:
        if f.read().strip() == results.file_sha256(path):
            return True
    logger.warning("chunk %s does not match its sha256: redoing it", path)
    return False


def build_chunks(model: nn.Module, train_dataset, collate, loss_fn, bases: dict, modules: dict, config: IndexConfig,
                 work: str, shard_index: int = 0, num_shards: int = 1) -> list:
    """Computes this shard's missing chunks into `work`; returns the chunks still missing (another shard's)."""
    num_chunks = math.ceil(len(train_dataset) / config.chunk_size)
    os.makedirs(work, exist_ok=True)
    for chunk in range(shard_index, num_chunks, num_shards):
        if _chunk_done(work, chunk):
            continue
        start, stop = chunk * config.chunk_size, min((chunk + 1) * config.chunk_size, len(train_dataset))
        collector = Collector(model, modules, bases, config.dtype, covariances=config.projection == "random",
                              norms=config.damping_factor is None)
        try:
            rows, norms = collect(model, collector, train_dataset.select(range(start, stop)), collate, loss_fn,
                                  config.batch_size, f"Index chunk {chunk + 1}/{num_chunks}")
        finally:
            collector.close()
        tensors = {"rows": rows.contiguous(), "norms": norms.contiguous()}
        for i, c in enumerate((collector.covariances or {}).values()):
            tensors[f"cov_in.{i}"], tensors[f"cov_out.{i}"] = c[0].contiguous(), c[1].contiguous()
            tensors[f"counts.{i}"] = torch.tensor(c[2:5], dtype=torch.float64)
        path = _chunk_path(work, chunk)
        with results.atomic_path(path) as tmp:
            save_file(tensors, tmp)
        with results.atomic_path(path + ".sha256") as tmp, open(tmp, "w") as f:
            f.write(results.file_sha256(path))
        failpoint("index_chunk_saved")
    return [c for c in range(num_chunks) if not _chunk_done(work, c)]


def merge_chunks(work: str, bases: dict, modules: dict, config: IndexConfig, num_train: int) -> dict:
    """Fits the preconditioner from the finished chunks and returns the index's tensors (written by the caller):
    `store` (examples x dims, preconditioned), `self_influence`, and per module its bases and Lambda + damping."""
    num_chunks = math.ceil(num_train / config.chunk_size)
    rows, norms, chunks = None, 0, []
    for c in range(num_chunks):  # filled chunk by chunk: the rows are held once
        chunk = load_file(_chunk_path(work, c))
        part = chunk.pop("rows")
        if rows is None:
            rows = part.new_empty(num_train, part.shape[1])
        start = c * config.chunk_size
        rows[start:start + len(part)] = part
        norms = norms + chunk.pop("norms").sum(dim=0)
        chunks.append(chunk)  # the covariances of a random projection
        del part
    norms = norms / num_train  # mean ||G||^2 per module
    tensors, offset, denominators = {}, 0, []
    for i, (name, module) in enumerate(modules.items()):
        b_in, b_out, values_in, values_out, kfac_mean = bases[name]
        k_in, k_out = b_in.shape[1], b_out.shape[1]
        block = rows[:, offset:offset + k_in * k_out].view(-1, k_out, k_in)
        if config.projection == "random":  # rotate into the eigenbasis of the projected covariances
            cov_in = sum(c[f"cov_in.{i}"] for c in chunks)
            cov_out = sum(c[f"cov_out.{i}"] for c in chunks)
            counts = sum(c[f"counts.{i}"] for c in chunks)
            values_in, q_in = torch.linalg.eigh((cov_in + cov_in.T) / (2 * counts[0]))
            values_out, q_out = torch.linalg.eigh((cov_out + cov_out.T) / (2 * counts[0]))
            block = q_out.T @ block @ q_in
            rows[:, offset:offset + k_in * k_out] = block.flatten(1)
            b_in, b_out = b_in @ q_in, b_out @ q_out
            trace_in, trace_out = counts[1] / counts[0], counts[2] / counts[0]
        else:
            trace_in = trace_out = None
        d_in, d_out = widths(module)
        if config.preconditioner == "ekfac":
            lam = block.square().mean(dim=0)
            mean = norms[i] / (d_in * d_out)  # the untruncated Lambda's mean: its trace is the mean ||G||^2
        elif config.preconditioner == "kfac":
            lam = torch.outer(values_out, values_in)
            mean = kfac_mean if trace_in is None else trace_in * trace_out / (d_in * d_out)
        else:
            lam, mean = torch.zeros(k_out, k_in, dtype=rows.dtype), 0.0
        damping = 0.0 if config.preconditioner == "identity" else (
            config.damping_factor if config.damping_factor is not None else 0.1 * float(mean))
        denominator = (lam + damping).to(rows.dtype)
        if config.preconditioner == "identity":
            denominator = torch.ones_like(denominator)
        denominators.append(denominator.flatten())
        tensors[f"basis_in.{i}"], tensors[f"basis_out.{i}"] = b_in.contiguous(), b_out.contiguous()
        tensors[f"denominator.{i}"] = denominator.contiguous()
        offset += k_in * k_out
    denominator = torch.cat(denominators)
    tensors["self_influence"] = torch.cat([(part.square() / denominator).sum(dim=1) for part in rows.split(4096)])
    rows.div_(denominator)
    if config.store_dtype == "float16" and not config.float64:  # per-example scale: 1/(Lambda + 1e-8) overflows it
        scale = rows.abs().amax(dim=1).clamp_min(torch.finfo(rows.dtype).tiny)
        rows.div_(scale[:, None])
        tensors["store_scale"] = scale
        rows = rows.half()
    tensors["store"] = rows
    return tensors


# ----------------------------------------------------------------------------------------------------------------------
# The published index, and queries against it

@dataclass
class GradientIndex:
    """A built index: the preconditioned store and what a query needs to be compressed the same way."""

    folder: str
    meta: dict
    store: torch.Tensor
    self_influence: torch.Tensor
    bases: dict  # {module name: (B_in, B_out)}
    store_scale: torch.Tensor | None = None  # float16 stores: each row's scale

    @property
    def num_train(self) -> int:
        return self.store.shape[0]

    @classmethod
    def load(cls, folder: str, checkpoint_sha256: str | None = None) -> "GradientIndex":
        """The verified index in `folder`; with `checkpoint_sha256`, refused unless built from that checkpoint."""
        try:
            meta = results.read(folder, INDEX_META, "gradient index")
        except (ResultMissing, ResultDamaged) as err:
            raise GlueError(f"{err}; build it with analyze.py --factor_strategy ekfac_index") from None
        built_from = meta["signature"]["checkpoint_sha256"]
        if checkpoint_sha256 is not None and built_from != checkpoint_sha256:
            raise GlueError(f"the gradient index in {folder} was built from another checkpoint "
                            f"({meta.get('checkpoint_dir')}, sha256 {built_from[:12]}); rebuild it for this one with "
                            "analyze.py --factor_strategy ekfac_index --overwrite")
        tensors = load_file(os.path.join(folder, INDEX_FILE))
        names = meta["modules"]
        bases = {n: (tensors[f"basis_in.{i}"], tensors[f"basis_out.{i}"]) for i, n in enumerate(names)}
        return cls(folder, meta, tensors["store"], tensors["self_influence"], bases, tensors.get("store_scale"))

    def query_rows(self, model: nn.Module, dataset, collate, measurement, batch_size: int,
                   disable_tqdm: bool = False) -> torch.Tensor:
        """Compressed measurement gradients of `dataset`'s examples (in its order), in the index's space."""
        dtype = self.bases[next(iter(self.bases))][0].dtype
        modules = linear_modules(model, list(self.bases))
        collector = Collector(model, modules, {n: (*b, None, None, None) for n, b in self.bases.items()}, dtype,
                              norms=False)
        try:
            rows, _ = collect(model, collector, dataset, collate, measurement, batch_size, "Query gradients",
                              disable_tqdm)
        finally:
            collector.close()
        return rows

    def scores(self, query_rows: torch.Tensor, normalize: bool = False, block: int = 8192) -> torch.Tensor:
        """(queries x training examples) influence scores, float32 (float64 for a float64 index)."""
        out = torch.empty(len(query_rows), self.num_train, dtype=query_rows.dtype)
        for start in range(0, self.num_train, block):
            out[:, start:start + block] = query_rows @ self.store[start:start + block].to(query_rows.dtype).T
        if self.store_scale is not None:
            out *= self.store_scale.to(out.dtype)
        if normalize:
            out /= self.self_influence.to(out.dtype).clamp_min(torch.finfo(out.dtype).tiny).sqrt()
        return out


def build_index(model: nn.Module, train_dataset, collate, task, modules: dict, bases: dict, config: IndexConfig,
                public: str, signature: dict, shard_index: int = 0, num_shards: int = 1,
                overwrite: bool = False) -> dict | None:
    """Builds (or reuses) the index published in `public`: this shard's chunks, then, once every chunk exists, the
    merge. Returns the index's metadata, or None while other shards' chunks are missing."""
    meta = results.reuse(public, INDEX_META, "gradient index", signature, overwrite)
    if meta is not None:
        logger.info("Reusing the gradient index %s", public)
        return meta
    root = results.staging_dir(public, {**signature, "batch_size": config.batch_size,
                                        "chunk_size": config.chunk_size})
    work = os.path.join(root, "chunks")
    entries = len(train_dataset) * sum(block_sizes(bases))
    results.check_free_space(os.path.dirname(os.path.abspath(public)),
                             entries * (8 if config.float64 else 4) * 2, "the gradient index")
    progress.stage("building the gradient index", root)
    model.eval()
    start = time.time()
    missing = build_chunks(model, train_dataset, collate, lambda b, m: task.compute_train_loss(b, m, sample=False),
                           bases, modules, config, work, shard_index, num_shards)
    build_seconds = time.time() - start
    if missing:
        logger.info("Chunks %s of the gradient index belong to other shards; rerun once they are done to merge",
                    " ".join(str(c) for c in missing[:10]))
        return None
    with results.lock(public):
        meta = results.reuse(public, INDEX_META, "gradient index", signature, False)
        if meta is not None:  # another shard merged meanwhile
            return meta
        start = time.time()
        tensors = merge_chunks(work, bases, modules, config, len(train_dataset))
        final = os.path.join(root, "index")
        os.makedirs(final, exist_ok=True)
        with results.atomic_path(os.path.join(final, INDEX_FILE)) as tmp:
            save_file(tensors, tmp, metadata={"format": "glue_attribution gradient index 1"})
        meta = results.publish(final, public, INDEX_META, {
            "signature": json.loads(json.dumps(signature, default=str)), "modules": list(modules),
            "dims": sum(block_sizes(bases)), "num_train": len(train_dataset),
            "build_seconds": build_seconds, "merge_seconds": time.time() - start,
            "bytes": os.path.getsize(os.path.join(final, INDEX_FILE))})
        import shutil

        shutil.rmtree(root, ignore_errors=True)
        results.clean_staging(public)
    return meta
