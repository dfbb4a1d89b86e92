"""The loft_hpc HDF5 file layout (format version 1). One layout for every stage and tool.

    /                         attrs: format="loft_hpc", format_version, stage, arch, world_size,
                              seed, created (ISO 8601), versions (YAML text: loft_hpc, torch,
                              horovod, h5py, numpy), complete (1 when the stage finished)
    /config                   dataset: the full job config as YAML text (scalar string)
    /progress                 attrs: step, round, epoch, total_steps, wall_time, bytes_sent, bytes_received
    /model/<tensor>           every parameter and buffer of the full model (state_dict keys)
    /optimizer/momentum/<p>   SGD momentum per parameter (LoFT carry / dense); absent when reset
    /rng/<rank>/torch         uint8 torch CPU generator state of that rank
    /rng/<rank>/cuda          (if any) uint8 CUDA generator state
    /rng/<rank>               attrs: numpy (JSON of numpy's legacy state), python (repr of random.getstate())
    /init/<tensor>            theta_0: the weights before the first step (pretraining files)
    /masks/<tensor>           uint8 0/1, gzip+shuffle; one per pruned weight (ticket and retrain files)
    /masks                    attrs: ratio, method, scope, level, mask_from, rewind
    /snapshots/index          (T, 3) int64 rows [step, round, epoch]; growing (maxshape None)
    /snapshots/scores/<group>/l2, l1
                              (T, C) float32 per filter group; row t = snapshot t; growing
    /snapshots/weights        attrs: step label -> file name (relative) of a full-weight snapshot
    /metrics                  compound (N,) growing: step, round, epoch, loss, train_acc,
                              test_loss, test_acc, lr, bytes_sent, bytes_received, wall_time
    /comm                     compound (R*S,) growing: round, step, rank, allgather_sent,
                              allgather_received, allreduce_sent, allreduce_received (bytes),
                              seconds (wall time this rank spent in those collectives)
    /sparsity                 compound per tensor: name, kept, total (ticket / retrain files)

Group names of filter groups may contain dots; tensor names are state_dict keys (dots kept).
Readers must check ``format_version``; writers bump it on any incompatible change.
"""
from __future__ import annotations

import numpy as np

FORMAT = "loft_hpc"
FORMAT_VERSION = 1

METRIC_FIELDS = [("step", np.int64), ("round", np.int64), ("epoch", np.float64), ("loss", np.float64),
                 ("train_acc", np.float64), ("test_loss", np.float64), ("test_acc", np.float64),
                 ("lr", np.float64), ("bytes_sent", np.int64), ("bytes_received", np.int64),
                 ("wall_time", np.float64)]
COMM_FIELDS = [("round", np.int64), ("step", np.int64), ("rank", np.int64), ("allgather_sent", np.int64),
               ("allgather_received", np.int64), ("allreduce_sent", np.int64), ("allreduce_received", np.int64), ("seconds", np.float64)]
SPARSITY_FIELDS = [("name", "S256"), ("kept", np.int64), ("total", np.int64)]
