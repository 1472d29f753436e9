"""The application floor: one module per entry point, each a frozen config and ``main(config)``.

=====================  ============================================  =================================
module                 config                                        script
=====================  ============================================  =================================
``pretrain``           ``config.PretrainConfig``                     ``experiments/pretrain.py``
``finetune``           ``config.FinetuneConfig``                     ``experiments/finetune.py``
``infer``              ``config.InferConfig``                        ``experiments/infer.py``
``demo``               ``config.PretrainConfig``                     ``experiments/demo.py``
``evaluate``           an evaluation study's config                  ``experiments/eval_*.py``
``loss_curve_sweep``   ``loss_curve_sweep.LossCurveSweepConfig``     ``experiments/eval_loss_curves.py``
``reproduce``          ``reproduce.ReproductionConfig``              ``experiments/eval_reproduction.py``
``export``             ``export.ExportConfig``                       ``selmerge-export`` (``main(argv)``)
=====================  ============================================  =================================

``config`` holds the experiment schemas, YAML loading with presets and ``--set`` overrides, and the command
line the scripts share. Floor 8 of ``docs/ARCHITECTURE.md``: nothing below imports this package.
"""
