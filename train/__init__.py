"""Training stage: store-backed loader, student, losses, trainer and export. Never imports the teacher.

Modules, one job each: ``tokenizer`` (FPS + kNN patches), ``encoder`` (Point-MAE encoder, its key names),
``concept`` (shared-weight concept queries), ``model`` (StudentConfig, variants, Student), ``config``
(TrainConfig), ``options`` (CLI options derived from the configs), ``augment``, ``losses``, ``data``
(StoreLoader), ``heldout`` (held-out loss), ``checkpoint``, ``metrics``, ``trainer`` (train), ``export``
(Point-MAE checkpoints in and out), ``ablate`` and ``table`` (ablations), ``cli`` (``pkd-train``).
"""
