"""Example models written the way a user writes them; run each as ``python -m models.NAME``."""
