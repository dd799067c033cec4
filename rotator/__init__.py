"""rotator: keeps AWS IAM access keys young and kills leaked ones."""

__version__ = "0.1.0"
