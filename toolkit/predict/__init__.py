"""toolkit.predict: spectra of new structures from a trained model or an ensemble (docs/predict.md).

* :mod:`toolkit.predict.stage`: the ``predict`` stage (a sharded stage, :mod:`toolkit.sharded`):
  ``plan``, ``unit_done``, ``run_units``, ``finalize``, ``run``; outputs predictions.csv,
  predictions.zarr, rejects.csv, figures/, experiment/, summary.json.
* :mod:`toolkit.predict.inputs`: structure inputs (prepare's sources, CIF/POSCAR/pymatgen JSON/ASE db).
* :mod:`toolkit.predict.models`: run directories, spectrolens checkpoints, upstream ALIGNN checkpoints.
* :mod:`toolkit.predict.experiment`: predicted vs measured (refractiveindex.info) spectra and onsets.
* :mod:`toolkit.predict.figures`: figures of predicted spectra.
"""

from toolkit.predict.models import PredictError, Predictor, load_predictor
from toolkit.predict.stage import finalize, load_result, plan, run, run_units, unit_done

__all__ = ["PredictError", "Predictor", "finalize", "load_predictor", "load_result", "plan", "run", "run_units",
           "unit_done"]
