"""Training on the farm: PyTorch image-to-image and classification templates.

The modules split along what each process needs: :mod:`.runs` (a run's folder on shared storage,
and its catalog description) imports neither torch nor OpenImageIO, so the catalog, the CLI and
Nuke can list trained models cheaply; :mod:`.data`, :mod:`.networks`, :mod:`.checkpoints`,
:mod:`.logs` and :mod:`.loop` are the trainer; :mod:`.trained` runs a trained model as a plugin.
"""
