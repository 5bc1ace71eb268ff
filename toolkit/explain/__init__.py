"""toolkit.explain: what the model learned — counterfactual probes and atom/bond/angle attributions.

A sharded stage (:mod:`toolkit.sharded`; the contract is implemented in :mod:`toolkit.explain.stage`):
``plan``, ``unit_done``, ``run_units``, ``finalize``, ``run``; plus :func:`explain_summary_for_report`.

* :mod:`toolkit.explain.options`: :class:`ExplainOptions` (settings and defaults) and the file paths.
* :mod:`toolkit.explain.edits`: documented structural edits (pymatgen).
* :mod:`toolkit.explain.probes`: edited structures through the model, feature shifts, extrapolation.
* :mod:`toolkit.explain.gradients`: integrated gradients on the atom, bond and angle embeddings.

docs/explain.md describes the method, the options and the outputs.
"""

from toolkit.explain.options import ExplainError, ExplainOptions, options_from_config
from toolkit.explain.stage import (
           explain_summary_for_report,
           finalize,
           plan,
           run,
           run_units,
           unit_done,
)

__all__ = ["ExplainError", "ExplainOptions", "explain_summary_for_report", "finalize", "options_from_config", "plan",
           "run", "run_units", "unit_done"]
