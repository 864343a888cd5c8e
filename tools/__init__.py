"""The project's secondary tools, each run from the repository root as `python tools/NAME.py`:
E2E evaluation and its metrics (evaluate_e2e.py, e2e_metrics.py), the comparison of the presets
(compare.py), the plots of a run (analyze.py), leaving the project (export.py), the offline demo
(demo.py) and the benchmarks (bench.py, with bench_lib.py, bench_job.py, bench_quant.py).
They import the project's modules at the root; nothing at the root imports them."""
