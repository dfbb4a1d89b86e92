"""The job configuration: one dataclass per concern, help text and range check beside each field.

``opt(default, help, check=..., choices=...)`` declares a field. :mod:`loft_hpc.config.load` reads
YAML and ``section.key=value`` overrides into these classes, type-checks and range-checks every
field, and checks the fields that depend on each other without the world size (steps, rewind and
``mask_from`` values, ticket names, ``data.root``). The job as a whole (data files, filter groups
against the world size, batch size against the samples per rank, milestones and rewind/snapshot
steps against the length of their stage, inputs of the requested stages) is checked on every rank,
with the data set loaded, by :func:`loft_hpc.validate.validate_job` before any collective.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from loft_hpc.config.steps import Step


def opt(default, help: str, check=None, choices=None, suggest=None):
    """A field; ``suggest``: names a failed ``check`` suggests the closest of (a typo)."""
    meta = {"help": help, "check": check, "choices": choices, "suggest": suggest}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


POS = (lambda v: 0 < v < float("inf"), "must be > 0 and finite")
NONNEG = (lambda v: v >= 0, "must be >= 0")
FRACTION = (lambda v: 0.0 <= v < 1.0, "must be in [0, 1)")
UNIT = (lambda v: 0.0 <= v <= 1.0, "must be in [0, 1]")
RATIOS = (lambda v: len(v) > 0 and all(0.0 < x < 1.0 for x in v), "must be a non-empty list of values in (0, 1)")

ARCHS = ("preresnet18", "preresnet34", "resnet34", "resnet18_lth", "lenet300_100", "conv2", "conv4", "conv6", "vgg19")
# the package's own models, or one whose filter groups are derived from its graph (loft_hpc/models/external.py)
ARCH = (lambda v: v in ARCHS or (v.startswith("torchvision.") and len(v) > 12)
        or re.fullmatch(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", v) is not None,
        f"must be one of {', '.join(ARCHS)}, torchvision.<name> (a classification CNN of "
        "torchvision.models.list_models()) or package.module:factory (your own)")
DATASETS = ("digits", "synthetic", "cifar10", "cifar100", "imagenet")
CONTROLS = ("random_reinit", "random_prune")
CONTROL_LIST = (lambda v: all(isinstance(x, str) and x in CONTROLS for x in v) and len(set(v)) == len(v),
                f"must be a list of distinct values from {', '.join(CONTROLS)}")


@dataclass
class DataConfig:
    name: str = opt("digits", "data set", choices=DATASETS)
    root: str = opt("", "folder holding the data set files (cifar: the cifar-10-batches-py parent; imagenet: folder with train/ and val/)")
    image_size: int = opt(0, "side of the (square) training images; 0 = the data set's own (digits: 32, cifar: 32, imagenet: 224)", check=NONNEG)
    batch_size: int = opt(128, "mini-batch size per rank (data-parallel stages average gradients over S x batch_size samples per step)", check=POS)
    eval_batch_size: int = opt(256, "batch size for evaluation", check=POS)
    num_workers: int = opt(0, "DataLoader worker processes per rank (0 = load in the training process)", check=NONNEG)
    augment: bool = opt(True, "standard augmentation of the data set (random crop + flip; digits: small random shifts)")
    verify_checksums: bool = opt(True, "check the MD5 of the CIFAR batch files (switch off for re-packed or test files)")
    shard: bool = opt(False, "LoFT pretraining: give each rank a disjoint 1/S shard of the training set (default false: every rank iterates the whole set in its own order, as the paper's code). Data-parallel stages (dense pretraining, retraining, IMP levels) always shard: an epoch is one pass over the training set in total, as with DistributedSampler")
    synthetic_train_size: int = opt(512, "synthetic data: training samples", check=POS)
    synthetic_test_size: int = opt(256, "synthetic data: test samples", check=POS)
    synthetic_classes: int = opt(10, "synthetic data: number of classes", check=(lambda v: v >= 2, "must be >= 2"))
    test_fraction: float = opt(0.25, "digits: fraction of the 1,797 images held out as the test set", check=(lambda v: 0.0 < v < 1.0, "must be in (0, 1)"))


@dataclass
class ModelConfig:
    arch: str = opt("preresnet18", "network architecture: the package's own (" + ", ".join(ARCHS) + "), torchvision.<name> (e.g. torchvision.resnet50, torchvision.mobilenet_v2) or package.module:factory (a function returning your nn.Module, called with whichever of num_classes, in_channels, image_size it takes); for the last two the filter groups are derived from the model's graph (README, Your own model)", check=ARCH, suggest=ARCHS)
    stem: str = opt("auto", "ResNet stem: cifar (3x3, no max-pool), imagenet (7x7/2 + max-pool), auto (from the data set)", choices=("auto", "cifar", "imagenet"))
    width: int = opt(64, "channels of the first stage (ResNets: 64 in the paper; 16 for the LTH ResNet-18); later stages double it", check=POS)
    inner_width_factor: float = opt(1.0, "ResNet blocks: inner width (conv1 out / bn2 / conv2 in) as a multiple of the block width (the paper's release uses 2)", check=POS)
    partition_rule: str = opt("loft", "which filter groups LoFT partitions: loft (the model's default: the paper's rule for ResNets, inner channels of the non-first blocks of stages 2-4; for a derived model the same rule read from its graph), all (every group; auto is the same), none", choices=("loft", "all", "auto", "none"))


@dataclass
class TrainConfig:
    method: str = opt("loft", "pretraining method: loft (filter-wise partitions, K local steps, shard exchange), dense (data parallel, gradients averaged every step) or gpipe (the model cut into S pipeline stages, one per rank, torch.distributed.pipelining's GPipe schedule over train.microbatches; the paper's baseline)", choices=("loft", "dense", "gpipe"))
    microbatches: int = opt(4, "gpipe: micro-batches per step (data.batch_size must be a multiple); BN normalises per micro-batch", check=POS)
    pipeline_cuts: list = opt([], "gpipe: where stages 2..S begin, as pipeline block names (e.g. [layer3.0] for S=2; blocks: stem, layer1.0, ..., head; a residual block is never cut inside); [] = balanced by train.pipeline_balance")
    pipeline_balance: str = opt("params", "gpipe without pipeline_cuts: balance the stages by parameter count (params: the weights a stage trains) or by forward FLOPs (flops: its compute; the paper's middle cut for S = 2)", choices=("params", "flops"))
    exchange: str = opt("allgather", "LoFT's exchange after K local steps: allgather (every rank receives every shard and keeps the full model) or alltoall (each rank keeps only the slices of the filters it trains, with their momentum, and sends each slice straight to the rank that trains it next round; the full model is assembled only for evaluation, snapshots and files). Bit-identical results; README, Transports and exchanges", choices=("allgather", "alltoall"))
    backend: str = opt("horovod", "transport of the collectives: horovod (the MPI communicator; needs horovod.torch) or torch (torch.distributed over the same ranks: gloo on CPU, NCCL on CUDA; for clusters where Horovod does not build). Same operations and byte counts; identical results on 2 ranks, equal to float rounding on more", choices=("horovod", "torch"))
    local_steps: int = opt(15, "LoFT: K, local SGD steps between two exchanges (the paper's ImageNet script: 15)", check=POS)
    workers: int = opt(0, "ranks that pretraining must run on (LoFT: S, the number of workers the filters are partitioned among); a job with the pretrain stage on another number of ranks is refused (exit 2). 0 = any (S = the ranks of the job)", check=NONNEG)
    momentum_mode: str = opt("carry", "LoFT: optimizer momentum across rounds: carry (each filter's momentum travels with it, shared momentum averaged) or reset (the paper's release)", choices=("carry", "reset"))
    duration: Step = opt(Step(20, "ep"), "pretraining length ('20ep' or '3000it'; for LoFT, local steps per rank)")
    lr: float = opt(0.1, "learning rate", check=POS)
    momentum: float = opt(0.9, "SGD momentum", check=FRACTION)
    weight_decay: float = opt(1e-5, "SGD weight decay", check=NONNEG)
    nesterov: bool = opt(False, "Nesterov momentum")
    schedule: str = opt("multistep", "learning-rate schedule", choices=("constant", "multistep", "cosine"))
    milestones: list = opt([], "multistep: steps at which lr is multiplied by gamma, e.g. ['10ep', '15ep'] or [57000, 114000]")
    gamma: float = opt(0.1, "multistep: lr factor at each milestone", check=POS)
    eval_every: Step = opt(Step(1, "ep"), "evaluate the full model every this many steps (LoFT: rounded up to a whole round)")
    train_eval_samples: int = opt(512, "training images (a fixed seeded sample, no augmentation) on which the assembled model's training loss and accuracy are measured at every evaluation, in every stage (0 = off)", check=NONNEG)
    lr_scaling: str = opt("none", "dense pretraining: scale lr (and nothing else) with the ranks S: none, or linear (lr x S, for the global batch S x batch_size)", choices=("none", "linear"))
    stop_at_ticket: bool = opt(False, "end pretraining at the snapshot where the ticket is detected (train.ticket_criterion); the final file is written as usual, /ticket records it, and pruning continues from those weights. Detection itself always runs (pretrain.h5 /ticket) and needs no communication")
    ticket_criterion: str = opt("filter_distance", "which detection decides (and stop_at_ticket stops on): filter_distance (LoFT's F(sigma) of every pruned group below ticket_threshold against each of the last ticket_window snapshots) or early_bird (normalised Hamming distance of the masks at ticket_ratio at most ticket_eb_threshold, You et al. 2020); both are computed and stored", choices=("filter_distance", "early_bird"))
    ticket_every: Step = opt(Step(1, "ep"), "ticket detection: compare snapshots about this far apart: the first snapshot at or after every multiple of it is used, the others skipped (Early-Bird checks once per epoch; snapshots a few steps apart barely differ while the weights are near theta_0 and would declare a ticket at once)")
    ticket_window: int = opt(3, "ticket detection: the newest filter-score snapshot is compared with each of the previous W snapshots (Early-Bird's FIFO of 5 masks is W = 4)", check=POS)
    ticket_threshold: float = opt(0.15, "ticket detection, filter_distance: the normalised filter distance (0 = same ranking, 1 = reversed) every comparison must stay below (0.15 with W = 3: on the default run it declares the ticket at epoch 6.2 of 12, where the tickets at 50% and 80% share 99.6% and 100% of their filters with those of the end; README, ticket detection)", check=POS)
    ticket_eb_threshold: float = opt(0.1, "ticket detection, early_bird: the mask distance every comparison must stay at or below (Early-Bird's 0.1)", check=POS)
    ticket_ratio: float = opt(0.5, "ticket detection, early_bird: the pruning ratio of the structured masks compared", check=(lambda v: 0.0 < v < 1.0, "must be in (0, 1)"))
    bn_recalibration: int = opt(20, "LoFT: recompute BN running statistics of the assembled model over this many training batches before each evaluation, weight snapshot and the final file (0 = keep the sub-networks' statistics, as the paper's release)", check=NONNEG)
    check_sync: bool = opt(False, "after every exchange, verify that all ranks hold the identical full model (one digest allgather per round; for debugging and tests)")
    log_every: int = opt(20, "log a line every this many steps", check=POS)
    seed: int = opt(0, "seed of everything: initial weights, partitions, data order, augmentation", check=NONNEG)
    device: str = opt("auto", "auto (one CUDA device per local rank when available, else CPU), cpu or cuda", choices=("auto", "cpu", "cuda"))
    deterministic: bool = opt(False, "torch's deterministic algorithms (torch.use_deterministic_algorithms, cuDNN benchmark off, CUBLAS_WORKSPACE_CONFIG): bit-identical reruns on CUDA too, at some speed; CPU runs are deterministic without it")
    threads: int = opt(0, "torch intra-op threads per rank (0 = cores / local ranks, at least 1)", check=NONNEG)
    progress: bool = opt(True, "tqdm progress bar on rank 0 (only when stderr is a terminal)")


@dataclass
class PruneConfig:
    method: str = opt("structured", "structured (whole filter groups by filter norm) or unstructured (single weights by magnitude)", choices=("structured", "unstructured"))
    scope: str = opt("layerwise", "rank filters / weights per layer (layerwise) or across the whole network (global). Structured global: one threshold on each filter's score standardised within its layer plus the log of its layer's typical filter magnitude, so at initialisation every layer loses about p and a layer of smaller weights loses more (loft_hpc/prune/structured.py)", choices=("layerwise", "global"))
    ratios: list = opt([0.5, 0.8], "target pruned fractions (of the pruned layers' weights or filters); one ticket per value, named by it. Unstructured layerwise: the LTH rates share p out among the layers (see conv_rate)", check=RATIOS)
    levels: int = opt(1, "IMP levels n: level k keeps (1-p)^(k/n) of the prunable units, every level but the last is retrained; 1 = one-shot", check=POS)
    score: str = opt("l2", "filter score for structured pruning: l2 (squared L2 norm, as the paper) or l1", choices=("l2", "l1"))
    groups: str = opt("partitioned", "structured: which filter groups are pruned: partitioned (the groups LoFT partitions, as the paper) or all", choices=("partitioned", "all"))
    conv_rate: float = opt(0.2, "unstructured layerwise: LTH per-round rate of conv layers: one LTH round prunes this fraction of each conv layer's surviving weights, so m rounds keep (1-conv_rate)^m. A ticket of ratio p is LTH's ticket after the (real) number of rounds m at which these compounded rates prune p overall, and each level k of n after the m_k rounds that keep (1-p)^(k/n) (Conv-2 after 5 rounds: conv 10%, fc 20%, ratio 0.66996 at 32x32x3: conv keeps 0.9^5, fc 0.8^5). 0 = conv layers not pruned", check=FRACTION)
    fc_rate: float = opt(0.2, "unstructured: LTH per-round rate of fully-connected layers, compounding like conv_rate (layerwise); 0 = fc layers not pruned (no mask, as the LTH ResNet-18/VGG-19 setting), also in global scope", check=FRACTION)
    mask_from: str = opt("end", "weights that rank the filters/weights: end (of pretraining) or a pretraining step in output.snapshot_weights ('5ep'): the ticket found at that snapshot")
    rewind: str = opt("end", "weights the ticket restarts from: init (theta_0), end (end of pretraining: fine-tuning, the paper's release), mask_from (the weights the mask is drawn from: a snapshot ticket restarts from its own snapshot, as if pretraining had stopped there) or a step like '500it' / '2ep' of pretraining")


def rewind_point(prune: "PruneConfig") -> str:
    """The pretraining point the ticket restarts from: ``prune.rewind``, with ``mask_from``
    resolved to ``prune.mask_from``."""
    return prune.mask_from if prune.rewind == "mask_from" else prune.rewind


@dataclass
class RetrainConfig:
    duration: Step = opt(Step(90, "ep"), "retraining length per ticket (and per IMP level)")
    lr: float = opt(0.1, "learning rate", check=POS)
    momentum: float = opt(0.9, "SGD momentum", check=FRACTION)
    weight_decay: float = opt(5e-4, "SGD weight decay", check=NONNEG)
    schedule: str = opt("multistep", "learning-rate schedule", choices=("constant", "multistep", "cosine"))
    milestones: list = opt([], "multistep milestones, e.g. ['30ep', '60ep', '80ep']")
    gamma: float = opt(0.1, "multistep lr factor", check=POS)
    lr_scaling: str = opt("none", "scale lr with the ranks S: none, or linear (lr x S, for the global batch S x data.batch_size)", choices=("none", "linear"))
    controls: list = opt([], "control branches retrained after each ticket with the same budget, each into its own file (retrain_pNN_<control>.h5): random_reinit (the ticket's masks on weights freshly initialised from a seed derived from train.seed) and random_prune (a random mask with the ticket's per-layer sparsity, on the ticket's rewound weights); e.g. [random_reinit, random_prune]", check=CONTROL_LIST)


@dataclass
class OutputConfig:
    dir: str = opt("runs/default", "output folder: checkpoints, logs, summary (relative to the current directory)")
    checkpoint_every: Step = opt(Step(1, "ep"), "write a checkpoint every this many steps (LoFT: rounded up to a whole round); also at the end")
    snapshot_every: Step = opt(Step(1, "ep"), "append filter-score snapshots every this many steps (LoFT: rounded up to a whole round)")
    snapshot_weights: list = opt([], "steps of pretraining at which its full weights are stored as snapshots too (snapshots/weights@<N>it.h5; for prune.mask_from, prune.rewind, --stage snapshots), e.g. ['500it', '5ep']")
    keep_checkpoints: int = opt(2, "checkpoint files kept per stage (the newest ones)", check=POS)
    resume: bool = opt(True, "continue from the latest checkpoint in the output folder when there is one")
    on_mismatch: str = opt("refuse", "a checkpoint or stage file made by another config or from other inputs: refuse (one line naming what differs, exit 2), restart (checkpoints only: start the stage over; existing stage files are still refused) or keep (use it anyway, with a warning)", choices=("refuse", "restart", "keep"))


@dataclass
class JobConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


SECTIONS = {
    "data": (DataConfig, "the data set and its loading"),
    "model": (ModelConfig, "the network and its filter groups"),
    "train": (TrainConfig, "pretraining: LoFT partition/exchange, optimisation, schedule"),
    "prune": (PruneConfig, "finding the ticket: structured/unstructured, one-shot/IMP, rewinding"),
    "retrain": (RetrainConfig, "retraining each ticket with its mask"),
    "output": (OutputConfig, "output folder, checkpoints, snapshots, resume"),
}

__all__ = ["JobConfig", "SECTIONS", "Step", "Optional"] + [c.__name__ for c, _ in SECTIONS.values()]
