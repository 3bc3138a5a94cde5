"""Framework-free ML core: checkpoints, preprocessing, inference, synthetic data and training.

Nothing in this package imports Django, so it can be installed and tested on its own and run
unchanged on any worker machine.
"""
