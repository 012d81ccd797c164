"""Cost: ``peftbench bench`` (train/eval speed, memory, FLOPs per method: ``speed.py``), the bench
tables shipped with the package (``tables/``), and ``peftbench run --dry-run`` estimates (``estimate.py``)."""
