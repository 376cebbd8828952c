"""mri_ensemble: the library behind the pipeline (data, networks, training, metrics, ensembles).

Pure torch/numpy/h5py/nibabel/MONAI: it imports no DVC, Prefect or MLflow, so it can be
used and tested on its own. The DVC stages in ``stages/`` and the Prefect flow in
``flows/`` call into it.
"""

__version__ = "0.1.0"
