"""What the tests share: single-process references, schedule simulation, fault injection and the worker scripts
that launcher jobs run by path (``HELPERS / "horovod_worker.py"``).

Test modules import these as ``helpers.<module>`` (``tests/`` is on ``sys.path``: pytest puts the root conftest's
folder there). Worker scripts run as ``python tests/helpers/<worker>.py`` import their siblings by plain name, their
own folder being first on their path.
"""

from pathlib import Path

HELPERS = Path(__file__).resolve().parent
ROOT = HELPERS.parents[1]  # the repository: recipes/, docs/, hybrid_ext/
