"""Lets a source checkout import ``hybrid_ext.integrations`` as an installed package does."""


def load_integrations() -> None:
    """Make ``hybrid_ext.integrations`` importable when running from a source checkout.

    setup.py installs the top-level ``integrations/`` as ``hybrid_ext.integrations``; in a checkout (say,
    ``python -m hybrid_ext`` from the repository root, which puts the source tree first on sys.path) it is
    beside this package instead, so load it from there under its installed name.
    """
    import importlib.util
    import sys
    from pathlib import Path

    if importlib.util.find_spec("hybrid_ext.integrations") is not None:
        return
    beside = Path(__file__).resolve().parent.parent / "integrations"
    spec = importlib.util.spec_from_file_location(
        "hybrid_ext.integrations", beside / "__init__.py", submodule_search_locations=[str(beside)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"hybrid_ext.integrations is neither installed nor at {beside}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


load_integrations()
