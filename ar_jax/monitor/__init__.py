"""A run's figures: progress and throughput, metric writers, profiles, peak FLOP rates."""
