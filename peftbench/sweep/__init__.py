"""Sweeps: protocols (``protocols.py``: which runs a method × task pair needs, in which stages),
planning with every input checked before compute (``plan.py``), driving the pipelines stage by
stage through an executor (``drive.py``)."""
