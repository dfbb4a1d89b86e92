"""The controls of a ticket (retrain.controls): random_reinit (the ticket's masks, fresh weights
from a derived seed) and random_prune (a random mask of the ticket's per-layer sparsity on its
rewound weights), retrained beside the ticket with the same budget, on two real MPI ranks; the
summary rows, the identities, the skip of a rerun, and a bad control name."""
from __future__ import annotations

import hashlib
import math

import pytest
import torch
import yaml

from loft_hpc.checkpoint.h5file import read_run_file
from loft_hpc.checkpoint.identity import make_identity
from loft_hpc.config import ConfigError, config_from_dict
from loft_hpc.data import build_datasets
from loft_hpc.prune.controls import control_seed, pruned_channels, random_prune_masks, reinit_state
from loft_hpc.stages.common import make_model
from loft_hpc.stages.summary import ticket_line
from loft_hpc.train.scores import filter_scores
from loft_hpc.utils.seeding import generator
from tests.mpi_util import TINY, ok, run_job

BASE = TINY + ["train.duration=16it", "train.local_steps=4", "train.eval_every=8it", "output.checkpoint_every=4it",
               "output.snapshot_every=4it", "retrain.duration=8it", "retrain.lr=0.05", "train.seed=5",
               "prune.ratios=[0.5]"]
ARGS = BASE + ["retrain.controls=[random_reinit,random_prune]"]
KINDS = ("random_reinit", "random_prune")


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.h5"))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One `--stage all` job with both controls on 2 ranks, then the same job again."""
    out = tmp_path_factory.mktemp("controls")
    first = ok(run_job(2, ["--stage", "all", *ARGS, f"output.dir={out}"]))
    before = _digests(out)
    again = ok(run_job(2, ["--stage", "all", *ARGS, f"output.dir={out}"]))
    files = {"ticket": read_run_file(out / "tickets_p50.h5"), "retrain": read_run_file(out / "retrain_p50.h5"),
             "pretrain": read_run_file(out / "pretrain.h5")}
    files.update({k: read_run_file(out / f"retrain_p50_{k}.h5") for k in KINDS})
    cfg = config_from_dict(yaml.safe_load(files["retrain"].config_yaml))
    return {"out": out, "first": first, "again": again, "before": before, "after": _digests(out), "cfg": cfg,
            "bundle": build_datasets(cfg.data), **files}


def test_files_and_identities(run):
    out, cfg = run["out"], run["cfg"]
    assert cfg.retrain.controls == list(KINDS)
    for k in KINDS:
        rf = run[k]
        assert rf.mask_attrs["control"] == k and rf.mask_attrs["control_seed"] == control_seed(5, k, 0.5, "end")
        assert rf.identity["kind"] == f"retrain-{k}"
        assert (out / "ckpt" / f"retrain_p50_{k}" / "LATEST").is_file()  # resumable under the file's stem
    assert set(run["random_reinit"].identity["inputs"]) == {"tickets_p50.h5"}
    assert set(run["random_prune"].identity["inputs"]) == {"tickets_p50.h5", "pretrain.h5"}
    # retrain.controls selects files: the ticket's own retraining has the identity it has without controls
    plain = config_from_dict(yaml.safe_load(run["retrain"].config_yaml), ["retrain.controls=[]"])
    assert run["retrain"].identity == make_identity(plain, "retrain", [out / "tickets_p50.h5"])
    assert "retrain.controls" not in run["retrain"].identity["config"]


def test_random_prune_has_the_tickets_per_layer_sparsity_and_weights(run):
    ticket, ctl, pre = run["ticket"], run["random_prune"], run["pretrain"]
    assert set(ctl.masks) == set(ticket.masks)
    for n, m in ticket.masks.items():
        assert int(ctl.masks[n].sum()) == int(m.sum()), n
    assert ctl.sparsity == ticket.sparsity
    assert any(not torch.equal(ctl.masks[n], m) for n, m in ticket.masks.items())
    # structured: every pruned group keeps as many channels as the ticket's, others chosen
    model = make_model(run["cfg"], run["bundle"])
    groups = model.filter_groups()
    a, b = pruned_channels(ticket.masks, groups), pruned_channels(ctl.masks, groups)
    assert a.keys() == b.keys() and a
    assert all(int(a[g].sum()) == int(b[g].sum()) for g in a)
    assert any(not torch.equal(a[g], b[g]) for g in a)
    # drawn from (seed, control, ratio, mask_from): the same masks again
    again = random_prune_masks(ticket.masks, model, groups, "structured", generator(control_seed(5, "random_prune", 0.5, "end")))
    assert all(torch.equal(again[n], ctl.masks[n]) for n in ticket.masks)
    # the ticket's own rewound weights (prune.rewind=end: the end of pretraining) under the random mask
    for n, w in pre.model.items():
        want = w * ctl.masks[n].to(w.dtype) if n in ctl.masks else w
        assert torch.equal(ctl.init[n], want), n


def test_random_reinit_has_the_tickets_masks_and_fresh_weights(run):
    ticket, ctl = run["ticket"], run["random_reinit"]
    assert set(ctl.masks) == set(ticket.masks)
    assert all(torch.equal(ctl.masks[n], m) for n, m in ticket.masks.items())
    assert ctl.sparsity == ticket.sparsity
    for n, m in ticket.masks.items():
        kept = m.bool()
        assert not torch.equal(ctl.init[n][kept], ticket.model[n][kept]), n
        assert not ctl.init[n][~kept].any(), n
    # neither the ticket's weights nor theta_0 of pretraining: the seed derived for this control
    conv = [n for n in ticket.masks if ticket.model[n].dim() == 4]
    assert conv and all(not torch.equal(ctl.init[n], run["pretrain"].init[n]) for n in conv)
    rebuilt = reinit_state(run["cfg"], run["bundle"], 0.5, ticket.masks)
    assert rebuilt.keys() == ctl.init.keys()
    assert all(torch.equal(rebuilt[n], ctl.init[n]) for n in rebuilt)


def test_training_started_from_the_stored_start_with_the_tickets_budget(run):
    """Row 0 of each file's filter-score snapshots is taken by the trainer before its first step:
    it is the scores of /init for the controls, of the ticket's weights for the ticket."""
    groups = make_model(run["cfg"], run["bundle"]).filter_groups()
    starts = {"retrain": run["ticket"].model, "random_reinit": run["random_reinit"].init,
              "random_prune": run["random_prune"].init}
    for name, start in starts.items():
        rf = run[name]
        assert rf.snap_index[0][0] == 0
        for g, sc in filter_scores(start, groups).items():
            assert torch.allclose(torch.as_tensor(rf.snap_scores[g]["l2"][0]), sc["l2"]), (name, g)
    tk = run["retrain"]
    assert tk.progress["step"] == tk.progress["total_steps"] == 8
    for k in KINDS:
        rf = run[k]
        assert (rf.progress["step"], rf.progress["total_steps"]) == (tk.progress["step"], tk.progress["total_steps"])
        assert [m["step"] for m in rf.metrics] == [m["step"] for m in tk.metrics]
    assert len({run[k].metrics[-1]["test_acc"] for k in ("retrain", *KINDS)}) >= 2  # three different networks


def test_summary_rows_follow_the_ticket(run):
    text = (run["out"] / "summary.txt").read_text()
    lines = text.splitlines()
    i = next(j for j, ln in enumerate(lines) if ln.startswith("ticket 50% retrained"))
    for off, k in enumerate(KINDS, start=1):
        cells = lines[i + off].split()
        assert cells[:2] == ["control", k], lines[i + off]
        assert float(cells[2]) == pytest.approx(run[k].metrics[-1]["test_acc"], abs=5e-5)
        assert cells[3] == lines[i].split()[4]  # same pruned fraction as the ticket
    assert "summary: " in run["first"].stdout
    line = ticket_line(run["pretrain"].ticket, run["pretrain"].progress)
    assert line is None or line in lines
    assert [ln for ln in lines if ln.startswith("ticket")] == [lines[i]]  # rows only: one ticket


def test_running_again_skips_every_file(run):
    out, p = run["out"], run["again"]
    for name in ("tickets_p50.h5", "retrain_p50.h5", "retrain_p50_random_reinit.h5", "retrain_p50_random_prune.h5"):
        assert f"{out / name} exists, skipping" in p.stdout, name
    assert run["after"] == run["before"]
    assert "retrain: retrain_p50" not in p.stdout  # nothing retrained


def test_unknown_control_is_refused_with_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^retrain\.controls: .*random_reinit, random_prune"):
        config_from_dict({}, ["retrain.controls=[random_reinit,random_shuffle]"])
    with pytest.raises(ConfigError, match=r"^retrain\.controls"):
        config_from_dict({}, ["retrain.controls=[random_prune,random_prune]"])
    p = run_job(0, ["--stage", "retrain", *BASE, "retrain.controls=[random_shuffle]", f"output.dir={tmp_path / 'r'}"])
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "retrain.controls" in lines[0] and "random_shuffle" in lines[0], p.stderr
    assert not (tmp_path / "r").exists()


def test_unstructured_random_prune_per_tensor_counts():
    g = torch.Generator().manual_seed(0)
    ticket = {"a.weight": torch.rand(6, 3, 3, 3, generator=g) > 0.7, "fc.weight": torch.rand(10, 20, generator=g) > 0.4}
    draw = lambda s: random_prune_masks(ticket, None, [], "unstructured", generator(s))  # noqa: E731
    a, b, c = draw(1), draw(1), draw(2)
    for n, m in ticket.items():
        assert a[n].shape == m.shape and a[n].dtype == torch.bool
        assert int(a[n].sum()) == int(m.sum())
        assert torch.equal(a[n], b[n]) and not torch.equal(a[n], c[n])
        assert not torch.equal(a[n], m)


def test_ticket_line():
    crit = {"filter_distance": {"emerged_step": 1200, "emerged_epoch": 6.0, "window": 3, "threshold": 0.05},
            "early_bird": {"emerged_step": 900, "emerged_epoch": 4.5, "window": 3, "threshold": 0.1}}
    t = {"emerged_step": 1200, "emerged_epoch": 6.0, "criterion": "filter_distance", "window": 3, "threshold": 0.05,
         "stopped_early": 1, "criteria": crit}
    assert ticket_line(t, {"step": 1200, "total_steps": 2400}) == (
        "pretraining: ticket detected at step 1200 (epoch 6.0, 50% of pretraining) by filter_distance (W=3, eps=0.05); "
        "early_bird: step 900 (epoch 4.5); pretraining stopped there")
    no = dict(t, emerged_step=-1, emerged_epoch=math.nan, stopped_early=0,
              criteria={"filter_distance": dict(crit["filter_distance"], emerged_step=-1),
                        "early_bird": dict(crit["early_bird"], emerged_step=-1)})
    assert ticket_line(no, {"step": 2400, "total_steps": 2400}) == (
        "pretraining: ticket not detected by filter_distance (W=3, eps=0.05) in 2400 steps of pretraining; early_bird: not detected")
    assert ticket_line({}, {"step": 5}) is None
