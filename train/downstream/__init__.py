"""Downstream evaluation of pre-trained encoders with Point-MAE's protocols (ModelNet40, ScanObjectNN,
few-shot ModelNet40, ShapeNetPart) and the paper's ScanNet semantic segmentation.

Modules: ``modelnet`` / ``shapenetpart`` / ``scanobjectnn`` (dataset loaders; ``scanobjectnn`` also its
task), ``files`` (their file helpers), ``metrics`` (accuracies, IoUs; pure numpy), ``models`` (classifier,
part segmenter, ``--init`` loading), ``sampling`` (per-batch FPS sampling and augmentation), ``engine`` (the
shared finetuning loop), ``classification`` and ``segmentation`` (the shape tasks), ``fewshot`` (folds and
their runs), ``scannet_seg`` (ScanNet semantic segmentation: task and model, its meshes read through
``pkd.common.seg_cache``), ``probe`` (linear SVM probe), ``votetest`` (``test modelnet40``), ``results``
(the shared results.json schema), ``compare`` (one table across runs), ``plots``, ``run`` (Python entry
points) and ``cli`` (typer apps ``finetune``, ``probe`` and ``test`` and the ``compare`` command for
``pkd-train``).
"""
