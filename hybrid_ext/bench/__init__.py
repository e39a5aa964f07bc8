"""Benchmarks, measured in one run: ``hybrid-ext bench allreduce`` (:mod:`~hybrid_ext.bench.allreduce`) and
``hybrid-ext bench train`` (:mod:`~hybrid_ext.bench.train`). ``hybrid-ext bench horovod`` lives with the Horovod
integration (``hybrid_ext.integrations.horovod.bench``).
"""
