"""``make bench``: LoFT, dense and GPipe pretraining side by side (:mod:`loft_hpc.bench.suite`),
with the per-rank memory probe (:mod:`loft_hpc.bench.probe`) and the machine description
(:mod:`loft_hpc.bench.machine`)."""
