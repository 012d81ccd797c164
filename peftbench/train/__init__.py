"""Training: one run → one record (``engine.py``), the loop and its public pieces (``loop.py``),
model building (``build.py``), typed hyper-parameters (``hparams.py``), optimisers and the lr
schedule (``optim.py``), process settings (``env.py``)."""
