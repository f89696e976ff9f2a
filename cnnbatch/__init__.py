"""cnnbatch: CNN features, classifier heads and bulk prediction for buckets of images, on Ray."""

__version__ = "0.1.0"
