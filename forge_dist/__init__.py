"""forge_dist: consistent callbacks and atomic, verifiable checkpoints for distributed Keras.

Importing this package never imports TensorFlow, Horovod or mpi4py.
"""

__version__ = "0.1.0"

from forge_dist.errors import ForgeDistError  # noqa: E402

__all__ = ["ForgeDistError", "__version__"]
