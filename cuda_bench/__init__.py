"""Benchmarks of sama_ext: kernel microbenchmarks (bench_kernels) and, later, the end-to-end
meta step. `python -m cuda_bench --quick` (or cuda_bench/run_all.py) runs the whole suite.
The folder name is historical: every benchmark runs on CPU and CUDA (--device)."""
