"""Adapters for host frameworks, installed as ``hybrid_ext.integrations``.

Each submodule imports its framework (torch.distributed, Horovod, DeepSpeed) only when it is itself imported.
"""
