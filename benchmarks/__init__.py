"""foldtune benchmarks: speed and memory of adapters, folding steps, metrics and the demo pipeline.

Run everything with `make bench` (= `python benchmarks/run_all.py`); each `bench_*.py` module also has a
`run(...)` function that returns markdown sections, so the harness can be tested on tiny shapes.
"""
