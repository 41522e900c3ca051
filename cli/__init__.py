"""The commands: stream-run, stream-serve, stream-eval, stream-convert (stream-bench is in
bench/)."""
