"""`python -m cuda_bench [--quick] [--device cpu|cuda] [--out DIR]`: the whole suite (run_all)."""
import sys

from cuda_bench.run_all import main

sys.exit(main())
