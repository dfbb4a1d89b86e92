"""The loft_hpc HDF5 file layout (format version 2). One layout for every stage and tool.

    /                         attrs: format="loft_hpc", format_version, stage, arch, world_size,
                              seed, created (ISO 8601), versions (YAML text: loft_hpc, torch,
                              horovod, h5py, numpy), complete (1 when the stage finished)
    /config                   dataset: the full job config as YAML text (scalar string)
    /identity                 dataset: JSON text {"kind", "config": {section.key: value}, "inputs":
                              {file name: sha256}}: what made this file (the config keys that change
                              results for this kind of stage, and the content hash of its input files).
                              A resume or a skip whose identity differs is refused (output.on_mismatch).
    /progress                 attrs: step, round, epoch, total_steps, batches_per_epoch, wall_time
    /model/<tensor>           every parameter and buffer of the full model (state_dict keys)
    /optimizer/momentum/<p>   SGD momentum per parameter (LoFT carry / dense); absent when reset
    /ranks/<rank>/torch       uint8 torch CPU generator state of that rank (checkpoints and final files)
    /ranks/<rank>/cuda        (if any) uint8 CUDA generator state
    /ranks/<rank>/run_stats   float64 [loss sum, correct, samples] of the steps since the last /metrics row
    /ranks/<rank>/buffers/<b> that rank's floating-point buffers as training left them (BN running
                              statistics before the averaging / recalibration of an evaluation)
    /ranks/<rank>             attrs: numpy (JSON of numpy's legacy state), python (repr of
                              random.getstate()), bytes_sent, bytes_received, comm_seconds (that
                              rank's counters since the start of the stage)
    /init/<tensor>            theta_0: the weights before the first step (pretraining files; control
                              files: the control's starting weights, masks applied)
    /masks/<tensor>           uint8 0/1, gzip+shuffle; one per pruned weight (ticket and retrain files)
    /masks                    attrs: ratio, method, scope, level, mask_from, rewind; control files
                              (retrain_pNN_<control>.h5) also control (random_reinit, random_prune)
                              and control_seed (the seed its weights or mask were drawn from)
    /snapshots/index          (T, 3) int64 rows [step, round, epoch]; growing (maxshape None)
    /snapshots/scores/<group>/l2, l1
                              (T, C) float32 per filter group; row t = snapshot t; growing
    /snapshots/weights        attrs: requested step label ('500it', '2ep') -> file name (relative) of
                              the full-weight snapshot, named by the step actually taken
                              (snapshots/weights@510it.h5 for 500it under LoFT with K = 15: the first
                              round boundary at or after the request); the snapshot file's
                              /progress has step (taken) and requested (the label)
    /metrics                  compound (N,) growing: step, round, epoch, step_loss, step_acc,
                              train_loss, train_acc, test_loss, test_acc, lr, bytes_sent,
                              bytes_received, wall_time. step_loss/step_acc: mean over the training
                              steps since the previous row of the network each rank trained (LoFT: its
                              sub-network, dense: the full model with its own batch statistics);
                              train_loss/train_acc: the assembled full model in eval mode on a fixed
                              sample of the training set without augmentation (train.train_eval_samples);
                              test_*: the assembled model on the whole test set; bytes: all ranks, cumulative
    /comm                     compound (R*S,) growing: round, step, rank, allgather_sent,
                              allgather_received, allreduce_sent, allreduce_received, p2p_sent,
                              p2p_received, alltoall_sent, alltoall_received, assemble_sent,
                              assemble_received (payload bytes of this rank; p2p: GPipe's
                              activations forward and gradients backward across stage boundaries;
                              alltoall: the lean exchange's slices to and from the other ranks;
                              assemble: the lean exchange's gathering of the full model at
                              evaluations, snapshots and files; files written before a column
                              existed lack it: read as 0), seconds (wall time this rank spent in
                              those collectives and transfers)
    /sparsity                 compound per tensor: name, kept, total (ticket / retrain files)
    /coverage                 compound per sliced tensor: name, trained_fraction (LoFT pretraining):
                              the fraction of its entries trained in each round (1 for a tensor
                              sliced on one dim; below 1 for one sliced on two, where only the
                              ranks' diagonal blocks train: the independent-subnet design)

/ticket                   attrs (pretraining files): emerged_step (-1 = not detected), emerged_epoch (NaN
                              = not detected), criterion (the deciding one, train.ticket_criterion), window,
                              threshold, stopped_early (1 when train.stop_at_ticket ended pretraining there),
                              score ("l2"), groups (JSON list of the filter groups compared), ratio
                              (early_bird's pruning ratio), every (train.ticket_every in steps: the
                              cadence; snapshots between are skipped, NaN distance)
/ticket/<criterion>/distance  float64 (T,) per criterion (filter_distance, early_bird): the window
                              distance at each snapshot of /snapshots/index (the largest distance between
                              that snapshot and each of the previous ``window``; NaN for the first ones);
                              attrs emerged_step, emerged_epoch, window, threshold of that criterion
                              (loft_hpc.metrics.ticket_detection)

Group names of filter groups may contain dots; tensor names are state_dict keys (dots kept).
Readers must check ``format_version``; writers bump it on any incompatible change.
"""
from __future__ import annotations

import numpy as np

FORMAT = "loft_hpc"
FORMAT_VERSION = 2

METRIC_FIELDS = [("step", np.int64), ("round", np.int64), ("epoch", np.float64), ("step_loss", np.float64),
                 ("step_acc", np.float64), ("train_loss", np.float64), ("train_acc", np.float64),
                 ("test_loss", np.float64), ("test_acc", np.float64),
                 ("lr", np.float64), ("bytes_sent", np.int64), ("bytes_received", np.int64),
                 ("wall_time", np.float64)]
COMM_FIELDS = [("round", np.int64), ("step", np.int64), ("rank", np.int64), ("allgather_sent", np.int64),
               ("allgather_received", np.int64), ("allreduce_sent", np.int64), ("allreduce_received", np.int64),
               ("p2p_sent", np.int64), ("p2p_received", np.int64), ("alltoall_sent", np.int64),
               ("alltoall_received", np.int64), ("assemble_sent", np.int64), ("assemble_received", np.int64),
               ("seconds", np.float64)]
SPARSITY_FIELDS = [("name", "S256"), ("kept", np.int64), ("total", np.int64)]
COVERAGE_FIELDS = [("name", "S256"), ("trained_fraction", np.float64)]
