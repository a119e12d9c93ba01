"""What runs experiments around the method (the top level): run each as `python -m experiments.NAME` from the
repository root."""
