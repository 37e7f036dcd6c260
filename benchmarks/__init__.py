"""Benchmarks: where the time goes (ratios measured inside one run) and the seeded quality table."""

import flows  # noqa: F401 - the same Prefect settings as the pipeline (no analytics, a patient ephemeral server)
