"""The model shipped with eqv2-calc, installed as the package ``eqv2_calc.shipped``.

Data only: ``eqv2-emt-small.pt`` and its model card ``README.md``. Locate the file with
:func:`eqv2_calc.checkpoint.registry.shipped_checkpoint`.
"""
