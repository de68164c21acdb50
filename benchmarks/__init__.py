"""Scripts that measure and print ratios within one run (`python -m benchmarks.<name>`)."""
