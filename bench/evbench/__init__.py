"""
evgate's side-by-side benchmarks: every scenario runs evgate and its peers
in the same run, on the same broker, with the same load generator, and
reports ratios.  See bench/README.md and docs/benchmarks.md.
"""
