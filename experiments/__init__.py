"""absl entry points: stages of a self-evolution round, tools and benchmarks."""
