"""The application floor: one module per entry point, each a frozen config and ``main(config)``.

====================  =========================================  =====================================
module                config                                     command
====================  =========================================  =====================================
``pretrain``          ``config.PretrainConfig``                  ``selmerge-pretrain``
``finetune``          ``config.FinetuneConfig``                  ``selmerge-finetune``
``infer``             ``config.InferConfig``                     ``selmerge-infer``
``export``            ``export.ExportConfig``                    ``selmerge-export``
``demo``              ``config.PretrainConfig``                  ``experiments/demo.py`` (``make demo``)
``evaluate``          an evaluation study's config               ``selmerge-eval TASK``
``loss_curve_sweep``  ``loss_curve_sweep.LossCurveSweepConfig``  ``selmerge-eval loss-curves``
``reproduce``         ``reproduce.ReproductionConfig``           ``selmerge-eval reproduction``
``launch_local``      its flags                                  ``python -m selmerge_jax.main.launch_local``
====================  =========================================  =====================================

``experiments/<name>.py`` and ``experiments/eval_<task>.py`` run the same commands as scripts of a checkout.
``config`` holds the experiment schemas, YAML loading with presets and ``--set`` overrides (``configs/``: the
packaged default configs); ``cli`` the command line every command shares (one-line errors for user mistakes).
Floor 8 of ``docs/ARCHITECTURE.md``: nothing below imports this package.
"""
