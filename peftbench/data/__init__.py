"""Task data: on-disk layouts, preprocessing and augmentation, image decoding, the decoded-image
cache, the training loader, ``peftbench data verify`` and ``peftbench data prepare``.

=================  ===========================================================================
``layouts/``       how split lists are stored (NOAH text files, VPT JSON files): a registry
``splits.py``      read a task's split through its layout; the task's data fingerprint
``transforms.py``  preprocessing geometries and training augmentations: registries
``images.py``      decoding and normalisation
``cache.py``       the decoded-image memory-mapped cache
``loader.py``      split tensors and the one batching policy (order, gather, augment, normalise)
``verify.py``      ``peftbench data verify``
``prepare/``       ``peftbench data prepare``: converters from public sources, per task
``bench.py``       ``peftbench data bench``
=================  ===========================================================================
"""
