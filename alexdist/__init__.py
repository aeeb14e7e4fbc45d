"""alexdist: the AlexNet family on CIFAR-10, on one CPU or many GPUs, through Hugging Face Accelerate."""

__version__ = "0.1.0"
