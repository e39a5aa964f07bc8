"""Transports: the contract (:mod:`.contract`), the transports that implement it, and the factory that builds a
group's transport (:mod:`.factory`).

One job per module, with no import cycles among them (``tests/unit/test_import_graph.py``):

- :mod:`.contract` — :class:`~.contract.Transport`, :class:`~.contract.PeerError`, the native collectives, and
  the optional capabilities a transport declares by subclassing them (:class:`~.contract.FusedReduce`,
  :class:`~.contract.HostRoutes`);
- :mod:`.shm` (ranks on one host; with :mod:`.shm_allreduce` and its kernels :mod:`.shm_kernels`),
  :mod:`.torch_p2p` (a process group's send/recv; failures explained by :mod:`.fault_notes`), :mod:`.routed`
  (both, by peer), :mod:`.staged` (device tensors through host memory, where :mod:`.device_route` says so),
  :mod:`.loopback` (ranks as threads of one process), :mod:`.native` (a group's own allreduce);
- :mod:`.factory` — the transport of a torch.distributed group (:func:`~.factory.transport_for`), or of any group
  whose ranks can all-gather (:func:`~.factory.compose`), as :mod:`.side_channel` does through a store;
- :mod:`.network_address` and :mod:`._c10d_private` — what the above need of the host and of torch's internals.

This package's ``__init__`` imports nothing, so importing one transport does not load the others.
"""
