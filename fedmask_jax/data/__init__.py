"""Datasets (TFDS array_record builders over the original archives) and client partitions."""

from fedmask_jax.data.archives import DataError
from fedmask_jax.data.datasets import DATASETS, Dataset, holdout_validation, load_dataset
from fedmask_jax.data.splits import SPLITS, partition

__all__ = ["DATASETS", "DataError", "Dataset", "SPLITS", "holdout_validation", "load_dataset",
           "partition"]
