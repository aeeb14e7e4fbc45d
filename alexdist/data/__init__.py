"""Data: the Dataset (dataset.py), its sources (sources.py, imagefolder.py), the on-disk cache (cache.py), and
batches built on the device (batches.py)."""
