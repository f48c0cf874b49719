"""Downstream evaluation of pre-trained encoders with Point-MAE's protocols (ModelNet40, ShapeNetPart).

Modules: ``modelnet`` / ``shapenetpart`` (dataset loaders), ``files`` (their file helpers), ``metrics``
(accuracies, IoUs; pure numpy), ``models`` (classifier, part segmenter, ``--init`` loading), ``sampling``
(per-batch FPS sampling and augmentation), ``engine`` (the shared finetuning loop), ``classification`` and
``segmentation`` (the two tasks), ``scannet_seg`` (ScanNet semantic segmentation: task and model, its meshes
read through ``pkd.common.seg_cache``), ``probe`` (linear SVM probe), ``plots``, ``run`` (Python entry points)
and ``cli`` (typer apps ``finetune``, ``test`` and ``probe`` for ``pkd-train``).
"""
