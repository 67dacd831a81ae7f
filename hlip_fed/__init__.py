"""hlip-fed: federated pre-training of HLIP, a hierarchical 3D medical language-image model."""

__version__ = "0.1.0"
