"""The evidence: what turns finished runs into measured claims, above every other layer of mtl
(it trains nothing itself, and nothing else in mtl imports it).

  sweep       running many runs of an experiment script as subprocesses (N at once, resumed)
  timing      each run's wall time and machine (<log_dir>/timings.jsonl) and their sums
  report      one multi-task run against its single-task baselines: Δm, report.md, report.json
  comparison  methods and architectures compared over seeds: selection, statistics, report.md
  stats       intervals, paired t-tests and Holm's adjustment over seeds
  plots       the PNG plots of a comparison and of a run report (matplotlib)

scripts/run_baselines.py, scripts/report.py and scripts/compare.py are their command lines.
"""
