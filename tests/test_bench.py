"""``make bench`` (loft_hpc/bench/suite.py, tools/bench.py) on its tiny setting: LoFT-2 (both
exchanges), dense-2 and GPipe-2 under real mpirun, one epoch each, and LoFT at K = 5 for the
exchange-share table.

Asserted: every byte column equals the analytic formulas, recomputed here from the closed forms of
loft_hpc/exchange/accounting.py and the models' float counts (not from the suite's own code
path), and equals the link rule applied to the run files' /comm columns (each rank's payload
equals its analytic count too); the Markdown table and the JSON exist
and carry the same figures; the probe recorded every rank's memory. Speeds and times are not
asserted (figures of a shared 2-core machine).
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from loft_hpc.bench import suite
from loft_hpc.bench.probe import launcher_rank
from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.exchange.accounting import (dense_eval_bytes, dense_fair_step, dense_paper_step, gpipe_fair_step,
                                          gpipe_paper_step, loft_fair_sync, loft_paper_sync, model_floats)
from tests.mpi_util import need_mpirun

TINY_STEPS = {"loft": 12, "loft-alltoall": 12, "dense": 6, "gpipe": 12}  # 192 images, batch 16: per rank / sharded / global


def comm_total(path) -> tuple[int, list[int]]:
    """(bytes over all links, each rank's payload sent + received) of a run file's /comm rows; the
    link rule written out here: allgather and assembly (S-1) x sent, allreduce 2 (S-1)/S x sent, p2p
    and alltoall sent."""
    rf = read_run_file(path)
    cols = tuple(f"{k}_{d}" for k in ("allgather", "allreduce", "p2p", "alltoall", "assemble") for d in ("sent", "received"))
    per = [sum(int(r.get(k, 0)) for r in rf.comm if int(r["rank"]) == q for k in cols) for q in range(rf.world_size)]
    S = rf.world_size
    tot = {k: sum(int(r.get(k, 0)) for r in rf.comm) for k in cols}
    links = ((S - 1) * (tot["allgather_sent"] + tot["assemble_sent"]) + 2 * (S - 1) * tot["allreduce_sent"] / S
             + tot["p2p_sent"] + tot["alltoall_sent"])
    assert links == int(links)
    return int(links), per


def gpipe_numels(setting, world: int) -> tuple[list[int], int]:
    """Per-sample activation sizes at the cuts of the FLOPs-balanced pipeline, and the bytes one
    assembly of the weights and one of the momentum send from all stages together (every
    parameter and buffer once; momentum: 4 bytes per parameter)."""
    from loft_hpc.models.pipeline import balanced_cuts, block_flops, boundary_shapes, pipeline_blocks

    blocks = pipeline_blocks(setting.model)
    sample = torch.zeros(1, setting.bundle.in_channels, setting.bundle.image_size, setting.bundle.image_size)
    cuts = balanced_cuts(block_flops(blocks, sample), world)
    state = setting.model.state_dict()
    weights = sum(t.numel() * t.element_size() for t in state.values())
    momentum = 4 * sum(p.numel() for p in setting.model.parameters())
    return [math.prod(s) for s in boundary_shapes(blocks, cuts, sample)], weights + momentum


def lean_links(setting, world: int, syncs: int) -> int:
    """Bytes over all links of the lean exchange: every round's slices to their next owners (from
    the two deals: filters kept in both, x entries per filter, x2 with the momentum), the shared
    tensors' allreduce as under allgather, and one assembly of the weights and one of the
    momentum under the last deal (the evaluation and the file at the end)."""
    from loft_hpc.exchange.accounting import assemble_bytes, loft_alltoall_bytes
    from loft_hpc.partition.plan import PartitionPlan

    m, groups = setting.model, setting.groups
    part = [g for g in groups if g.partitioned]
    keeps = [[PartitionPlan.draw(setting.cfg.train.seed, r, part, world).keep(q) for q in range(world)]
             for r in range(syncs + 1)]
    a2a = sum(loft_alltoall_bytes(m, groups, keeps[r - 1], keeps[r], q, True)["alltoall_sent"]
              for r in range(1, syncs + 1) for q in range(world))
    f = model_floats(m, groups)
    _, sh = f.loft_floats(True)
    shared = syncs * 2 * (world - 1) * 4 * sh  # the allreduce of the shared floats, as loft_fair_sync counts it
    asm = sum(assemble_bytes(m, groups, keeps[syncs], q, mom)["assemble_sent"] for q in range(world) for mom in (False, True))
    return a2a + shared + (world - 1) * asm


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    need_mpirun()
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        assert suite.main(["--tiny", "--ranks", "2", "--reps", "1", "--share-k", "5", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    return out, json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_byte_columns_equal_the_analytic_formulas(bench):
    out, res, _ = bench
    methods = ["loft", "loft-alltoall", "dense", "gpipe"]
    assert [(r["method"], r["S"]) for r in res["runs"]] == [(m, 2) for m in methods]
    setting = suite.Setting(res["config"], suite.TINY, 1, 4, 4, "flops")
    f = model_floats(setting.model, setting.groups)
    B = 16
    for r in res["runs"]:
        m = r["method"]
        steps = TINY_STEPS[m]
        assert (r["steps"], r["steps_per_epoch"], r["epochs"], r["evaluations"]) == (steps, steps, 1, 1), r
        if m == "loft":  # carry: parameters' momentum travels too; 12 steps of K = 4: 3 syncs
            p, sh = f.loft_floats(True)
            fair, paper = 3 * loft_fair_sync(p, sh, 2), 3 * loft_paper_sync(f.partitioned_params, f.shared_params, 2)
        elif m == "loft-alltoall":  # the paper's convention does not depend on the exchange
            fair, paper = lean_links(setting, 2, 3), 3 * loft_paper_sync(f.partitioned_params, f.shared_params, 2)
            p, sh = f.loft_floats(True)
            assert fair < 3 * loft_fair_sync(p, sh, 2)
        elif m == "dense":  # 6 steps, then the evaluation averages the BN statistics
            fair, paper = 6 * dense_fair_step(f.params, 2) + dense_eval_bytes(f.buffers, 2), 6 * dense_paper_step(f.params, 2)
        else:
            n, assembly = gpipe_numels(setting, 2)  # + the stages gathered once for the evaluation and the file
            assert [math.prod(s) for s in r["boundary_shapes"]] == n
            fair, paper = 12 * gpipe_fair_step(B, n) + (2 - 1) * assembly, 12 * gpipe_paper_step(B, n)
        assert fair > 0 and paper > 0
        measured, per_rank = comm_total(f"{r['run_dir']}/pretrain.h5")
        assert r["fair_run_measured"] == measured == fair == r["fair_run_analytic"], m
        assert r["fair_per_epoch_measured"] == r["fair_per_epoch_analytic"] == fair and r["fair_per_epoch_difference"] == 0
        assert r["payload_per_rank_measured"] == per_rank == r["payload_per_rank_analytic"] and r["per_rank_equal"]
        assert r["paper_run_analytic"] == r["paper_per_epoch_analytic"] == paper
        # the probe: one record per rank, the process's own peak resident memory
        assert len(r["peak_rss_bytes_per_rank"]) == 2 and min(r["peak_rss_bytes_per_rank"]) > 10 * 2**20
        assert r["peak_rss_bytes_max"] == max(r["peak_rss_bytes_per_rank"])
        assert r["comm_timed"] and r["comm_share"] > 0  # GPipe: its waits on point-to-point transfers


def test_markdown_and_json_agree(bench):
    out, res, md = bench
    assert (out / "results.md").is_file() and (out / "results.json").is_file()
    assert res["machine"]["cores"] and res["machine"]["torch"] == torch.__version__ and "Machine:" in md
    rows = {}
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 14 and cells[0] in suite.METHODS:
            rows[(cells[0], int(cells[1]))] = cells
    assert set(rows) == {(r["method"], r["S"]) for r in res["runs"]}
    for r in res["runs"]:
        c = rows[(r["method"], r["S"])]
        assert c[3] == f"{r['images_per_epoch']:,}"
        assert [int(x.replace(",", "")) for x in c[4:9]] == [
            r["fair_per_epoch_measured"], r["fair_per_epoch_analytic"], r["fair_per_epoch_difference"],
            r["eval_bytes_analytic"], r["paper_per_epoch_analytic"]]
        assert (r["eval_bytes_analytic"] == r["assemble_link_measured"]) == (r["method"] != "dense")
        assert c[11] == ("not timed" if r["comm_share"] is None else f"{r['comm_share']:.1%}")
        assert c[12] == f"{r['peak_rss_bytes_max'] / 2**20:,.0f}"
    heads = [h for h in res["headline"]]
    assert [(h["S"], h["loft_method"], h["convention"]) for h in heads] == [
        (2, "loft", "fair (measured)"), (2, "loft-alltoall", "fair (measured)"), (2, "loft", "paper (analytic)")]
    for h, col in zip(heads, (4, 4, 8)):
        gp, lo = rows[("gpipe", 2)], rows[(h["loft_method"], 2)]
        assert h["gpipe"] == int(gp[col].replace(",", "")) and h["loft"] == int(lo[col].replace(",", ""))
        ex = "either" if col == 8 else h["exchange"]
        assert re.search(rf"\| 2 \| {ex} \| {re.escape(h['convention'])} \| {h['gpipe']:,} \| {h['loft']:,} \| "
                         rf"{h['gpipe_over_loft']:.2f}x \| 1.26x \|", md)
    sub = res["subnetwork"]
    assert [s["S"] for s in sub] == [2] and sub[0]["flops_ratio"] > 1
    assert f"| 2 | {sub[0]['full_step_ms']:.1f} | {sub[0]['sub_step_ms']:.1f} | {sub[0]['speedup']:.3f} | " \
           f"{sub[0]['flops_ratio']:.3f} |" in md


def test_exchange_share_table(bench):
    """LoFT at K = 5 under both exchanges: measured bytes equal the analytic count (12 steps: 3
    syncs, as at K = 4), the exchange's seconds are timed, and the table shows each job."""
    out, res, md = bench
    assert res["share_k"] == [5]
    share = {(r["method"], r["local_steps"]): r for r in res["share"]}
    assert set(share) == {("loft", 5), ("loft-alltoall", 5)}
    main = {r["method"]: r for r in res["runs"]}
    for (m, k), r in share.items():
        assert r["syncs"] == 3 and r["fair_run_difference"] == 0 and r["per_rank_equal"] and r["comm_timed"]
        assert r["fair_run_measured"] == main[m]["fair_run_measured"]  # the same syncs and deals as at K = 4
        assert f"| 2 | 5 | {r['exchange']} | 3 | {r['fair_per_epoch_measured']:,} | 0 |" in md
    assert "## LoFT: the exchange's share of wall time at K = 5" in md


def test_probe_rank_from_the_launcher(monkeypatch):
    for v in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(v, raising=False)
    assert launcher_rank() == 0
    monkeypatch.setenv("PMI_RANK", "3")
    assert launcher_rank() == 3
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    assert launcher_rank() == 1


def test_memory_table_allgather_against_alltoall(bench):
    """The memory comparison ran at S = 1 and 2, both exchanges: every rank sampled its memory
    while training, and the lean exchange moved fewer bytes per sync (exact counts; memory is a
    measurement of this machine, not asserted)."""
    out, res, md = bench
    mem = {(m["S"], m["exchange"]): m for m in res["memory"]}
    assert set(mem) == {(s, ex) for s in (1, 2) for ex in ("allgather", "alltoall")}
    for m in mem.values():
        assert len(m["train_tensor_bytes_per_rank"]) == m["S"] and min(m["train_tensor_bytes_per_rank"]) > 0
        assert min(m["train_rss_bytes_per_rank"]) > 0 and m["syncs"] == (3 if m["S"] > 1 else 0)  # 1 rank: no rows
    assert mem[(1, "allgather")]["exchange_link_bytes_per_sync"] == mem[(1, "alltoall")]["exchange_link_bytes_per_sync"] == 0
    assert 0 < mem[(2, "alltoall")]["exchange_link_bytes_per_sync"] < mem[(2, "allgather")]["exchange_link_bytes_per_sync"]
    assert mem[(2, "alltoall")]["assemble_link_bytes"] > 0 == mem[(2, "allgather")]["assemble_link_bytes"]
    assert "## LoFT's memory per rank: allgather against alltoall" in md
