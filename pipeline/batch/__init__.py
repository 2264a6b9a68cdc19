"""Running studies: ``study`` (one study through the stages, top to bottom), ``run`` (the batch loop: discovery,
resume, shards, batch.json), ``executors`` (supervised local worker pool, Dask), ``segment_file``
(``modicscan segment`` on one image).
"""
