"""resnet-pipeline: reproduce the ResNet paper's ImageNet table with DVC, Ray and MLflow.

Importing the package has no side effects (no env vars, logging set-up or backend flags).
"""

__version__ = "0.1.0"
