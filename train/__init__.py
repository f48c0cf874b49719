"""Training stage: store-backed loader, student, losses, trainer and export. Never imports the teacher.

Modules, one job each: ``tokenizer`` (FPS + kNN patches), ``encoder`` (Point-MAE encoder, its key names),
``concept`` (shared-weight concept queries), ``model`` (StudentConfig, variants, build_student),
``augment``, ``losses``, ``data`` (StoreLoader), ``checkpoint``, ``metrics``, ``trainer`` (TrainConfig,
train), ``export`` (Point-MAE checkpoints in and out), ``run`` (ablations), ``cli`` (``pkd-train``).
"""
