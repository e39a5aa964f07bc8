"""What hybrid-ext builds over one Horovod session, and forgetting it when the session ends."""

from __future__ import annotations

from hybrid_ext.integrations.horovod import groups, transport


def reset() -> None:
    """Forget every side channel, communicator and partitioner grid made so far, and close the channels.

    ``hvd.shutdown`` calls this once :func:`~hybrid_ext.integrations.horovod.register` has run (so does
    ``hvd.elastic.run`` between attempts); call it yourself after re-initializing Horovod without
    ``register()``. Models parallelized over an old grid (``horovod_groups()``) still hold its communicators:
    parallelize them anew after a reset.
    """
    groups.forget()
    transport.forget_channels()
