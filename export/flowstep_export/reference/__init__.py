"""Independent PyTorch references the tests and goldens compare flowstep with."""
