"""stream-bench: benchmarks and studies on top of the public engine API."""
