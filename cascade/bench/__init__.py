"""The benchmark harness: datasets, scorers, runs, replay, reports, calibration."""
