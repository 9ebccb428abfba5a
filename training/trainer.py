"""The distributed training core: a DistributedModelParallel DLRM over a job's working set.

The TorchRec planner shards the embedding tables across the ranks (table-wise: each table
lives whole on one rank, so the rank that owns a table pulls and pushes exactly that
table's rows); the dense part is data-parallel (DDP inside DMP). Embeddings train with
fused row-wise Adagrad, whose per-row state is what the parameter service keeps beside
each vector; the dense part trains with Adam.

Rows are moved in and out of the sharded tables through the local shards of the model's
state dict and the fused optimizer's state, which are views of the TBE kernels' storage.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.distributed as dist

from core.settings import TrainingSettings
from training.data import Columns, batches, ips_weights, partition
from training.model import DLRM, ModelConfig

if TYPE_CHECKING:
    from torchrec.distributed import DistributedModelParallel


@dataclass(frozen=True)
class HParams:
    """The optimisation knobs of one job; built from the settings (``from_settings``), no defaults of its own."""

    epochs: int
    batch_size: int
    embedding_lr: float  # row-wise Adagrad of the tables
    dense_lr: float  # Adam of the dense part
    seed: int  # dense initialisation and batch order
    ips_max_weight: float | None  # inverse-propensity weighting of the loss, clipped here; None: unweighted

    @classmethod
    def from_settings(cls, train: TrainingSettings) -> HParams:
        return cls(
            epochs=train.epochs,
            batch_size=train.batch_size,
            embedding_lr=train.embedding_lr,
            dense_lr=train.dense_lr,
            seed=train.seed,
            ips_max_weight=train.ips_max_weight if train.ips_weighting else None,
        )


def init_distributed(backend: str = "auto") -> tuple[int, int, torch.device]:
    """Join the torchrun process group (env:// rendezvous); a plain process becomes a 1-rank group."""
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    chosen = "nccl" if (backend == "nccl" or (backend == "auto" and use_cuda)) else "gloo"
    # not under torchrun: a private single-rank group, its rendezvous an in-process store (a free TCP port
    # picked for env:// could be taken by another process before the group bound it: EADDRINUSE in the suite)
    private = "MASTER_PORT" not in os.environ and os.environ.get("WORLD_SIZE", "1") == "1"
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if chosen == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        if private:
            dist.init_process_group(chosen, store=dist.HashStore(), rank=0, world_size=1)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group(chosen)
    return dist.get_rank(), dist.get_world_size(), device


@dataclass
class Sharded:
    model: DistributedModelParallel
    dense_optimizer: torch.optim.Optimizer
    owners: dict[str, int]  # table -> rank that holds it
    config: ModelConfig
    table_rows: dict[str, int]
    _weights: dict[str, torch.Tensor] = field(default_factory=dict)  # owned table -> local weight view
    _state: dict[str, torch.Tensor] = field(default_factory=dict)  # owned table -> local momentum view

    def owned(self, rank: int) -> list[str]:
        return [t for t in self.config.sparse_features if self.owners[t] == rank]


def build_sharded(
    config: ModelConfig, table_rows: Mapping[str, int], hparams: HParams, device: torch.device
) -> Sharded:
    """Plan, shard and wrap the model; every rank of the default group must call this together."""
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingEnv
    from torchrec.optim import RowWiseAdagrad
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    torch.manual_seed(hparams.seed)  # identical dense initialisation on every rank
    model = DLRM(config, table_rows, device=torch.device("meta"))
    model.dense_arch.to(device)
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": hparams.embedding_lr})
    sharder = EmbeddingBagCollectionSharder()
    world = dist.get_world_size()
    # table-wise: a table lives whole on one rank, so row ownership is per table and
    # pulls/pushes of full rows (vector + state) stay on the rank that owns them
    constraints = {t: ParameterConstraints(sharding_types=["table_wise"]) for t in config.sparse_features}
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device=device.type), constraints=constraints
    )
    plan = planner.collective_plan(model, [sharder], dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=device, plan=plan, sharders=[sharder]
    )
    owners = {}
    for table, sharding in plan.plan["ebc"].items():
        if sharding.sharding_type != "table_wise" or len(sharding.ranks) != 1:
            raise RuntimeError(f"table {table}: expected table-wise sharding, got {sharding.sharding_type}")
        owners[table] = sharding.ranks[0]
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=hparams.dense_lr),
    )
    sharded = Sharded(dmp, dense_optimizer, owners, config, dict(table_rows))
    _bind_views(sharded, dist.get_rank())
    return sharded


def _bind_views(sharded: Sharded, rank: int) -> None:
    state_dict = sharded.model.state_dict()
    optimizer_state = sharded.model.fused_optimizer.state_dict()["state"]
    for table in sharded.owned(rank):
        key = f"ebc.embedding_bags.{table}.weight"
        shards = state_dict[key].local_shards()
        momentum = optimizer_state[key][f"{table}.momentum1"].local_shards()
        if len(shards) != 1 or len(momentum) != 1:
            raise RuntimeError(f"table {table}: expected one local shard on rank {rank}, got {len(shards)}")
        sharded._weights[table] = shards[0].tensor
        sharded._state[table] = momentum[0].tensor


def load_rows(sharded: Sharded, table: str, weights: np.ndarray, state: np.ndarray) -> None:
    """Write pulled rows (row i = local index i) and their row-wise Adagrad state into an owned table."""
    view, momentum = sharded._weights[table], sharded._state[table]
    if weights.shape != tuple(view.shape):
        raise ValueError(f"table {table}: rows {weights.shape} do not fit the shard {tuple(view.shape)}")
    with torch.no_grad():
        view.copy_(torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32)))
        momentum.copy_(torch.from_numpy(np.ascontiguousarray(state, dtype=np.float32).reshape(-1)))


def read_rows(sharded: Sharded, table: str) -> tuple[np.ndarray, np.ndarray]:
    """Current vectors [n, D] and row-wise Adagrad state [n, 1] of an owned table."""
    with torch.no_grad():
        return (
            sharded._weights[table].detach().cpu().numpy().copy(),
            sharded._state[table].detach().cpu().numpy().reshape(-1, 1).copy(),
        )


@dataclass
class TrainResult:
    steps: int = 0
    samples: int = 0  # over all ranks
    losses: list[float] = field(default_factory=list)  # per step, mean over ranks
    seconds: float = 0.0


def train(
    sharded: Sharded,
    columns: Columns,
    local: Mapping[str, np.ndarray],
    train_rows: np.ndarray,
    hparams: HParams,
    rank: int,
    world: int,
    device: torch.device,
    on_step: Callable[[int, int, float], None] | None = None,
    crash_after_steps: int | None = None,
) -> TrainResult:
    """Epochs of data-parallel training; each rank takes an equal share of a shuffled order per epoch.

    With ``hparams.ips_max_weight`` the loss of each batch is its clipped inverse-propensity weighted
    mean (normalised by the batch's weights, so the step size keeps its meaning).
    """
    model, features = sharded.model, sharded.config.sparse_features
    weights = None if hparams.ips_max_weight is None else ips_weights(columns, hparams.ips_max_weight)
    rng = np.random.default_rng(hparams.seed)  # same permutation on every rank: shares stay disjoint
    result = TrainResult()
    model.train()
    start = time.perf_counter()
    for _epoch in range(hparams.epochs):
        mine = partition(rng.permutation(train_rows), world, rank)
        epoch_losses = []
        for batch in batches(columns, local, mine, hparams.batch_size, features, weights):
            logits = model(batch.dense.to(device), batch.sparse.to(device))
            loss = weighted_bce(logits, batch.labels.to(device), batch.weights)
            sharded.dense_optimizer.zero_grad()
            loss.backward()
            sharded.dense_optimizer.step()
            value = float(loss.detach())
            epoch_losses.append(value)
            result.steps += 1
            result.samples += batch.size * world
            if on_step is not None:
                on_step(result.steps, batch.size * world, value)
            if crash_after_steps is not None and rank == 0 and result.steps >= crash_after_steps:
                os.kill(os.getpid(), signal.SIGKILL)  # fault injection: die like an OOM kill would
        losses = torch.tensor(epoch_losses, dtype=torch.float64)
        if world > 1:  # one collective per epoch, not per step
            dist.all_reduce(losses)
            losses /= world
        result.losses.extend(losses.tolist())
    result.seconds = time.perf_counter() - start
    return result


def weighted_bce(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Binary cross-entropy of the batch: the plain mean, or with ``weights`` their weighted mean."""
    if weights is None:
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    weights = weights.to(logits.device)
    per_sample = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    return (per_sample * weights).sum() / weights.sum()


def predict(
    sharded: Sharded,
    columns: Columns,
    local: Mapping[str, np.ndarray],
    rows: np.ndarray,
    batch_size: int,
    device: torch.device,
) -> np.ndarray:
    """Click probabilities of ``rows``; every rank must call it with the same rows (forward is collective)."""
    model, out = sharded.model, []
    model.eval()
    with torch.no_grad():
        for batch in batches(columns, local, rows, batch_size, sharded.config.sparse_features):
            out.append(torch.sigmoid(model(batch.dense.to(device), batch.sparse.to(device))).cpu().numpy())
    model.train()
    return np.concatenate(out) if out else np.zeros(0, dtype=np.float32)


def gather_to_rank0(obj: object, rank: int, world: int) -> list[object] | None:
    """Every rank's ``obj`` on rank 0 (None elsewhere)."""
    if world == 1:
        return [obj]
    out: list[object] | None = [None] * world if rank == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_from_rank0(obj: object, rank: int, world: int) -> object:
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
