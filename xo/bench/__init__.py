"""`xo bench`: the project's benchmarks in one lab run, written up as a report directory."""
