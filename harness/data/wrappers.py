"""Datasets around a dataset: same samples plus something (a cache, weak labels, a method's keys).

:class:`DatasetWrapper` forwards what the harness reads from a dataset (``num_classes``,
``class_names``, ``ignore_index``, ``extra_metrics``, ``skipped``, ...) to the wrapped
one, so wrappers stack in any order.
"""

from __future__ import annotations

from torch.utils.data import Dataset


class DatasetWrapper(Dataset):
    """Same length and dataset attributes as ``dataset``; subclasses change ``__getitem__``."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getattr__(self, name):
        # only reached for names the wrapper lacks; dunders and ``dataset`` itself (before
        # __init__ ran, e.g. while unpickling in a worker) must not recurse
        if name == "dataset" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index):
        return self.dataset[index]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.dataset!r})"


class InMemory(DatasetWrapper):
    """Keeps every sample after its first read (``data.cache_in_memory``: small data sets such as the demo's).

    Each read returns a shallow copy of the cached dict, so a wrapper adding keys does not
    change the cache; the tensors themselves are never modified in place by the trainer.
    """

    def __init__(self, dataset):
        super().__init__(dataset)
        self.cache: dict[int, dict | None] = {}

    def __getitem__(self, index):
        if index not in self.cache:
            self.cache[index] = self.dataset[index]
        sample = self.cache[index]
        return None if sample is None else dict(sample)


def first_sample(dataset) -> dict:
    """The first sample that reads (samples skipped with ``on_error="skip"`` are ``None``).

    Used to learn the input channels before a model exists. Raises ``ValueError`` when no
    sample of the dataset can be read.
    """
    for i in range(len(dataset)):
        sample = dataset[i]
        if sample is not None:
            return sample
    report = getattr(dataset, "skip_report", None)
    raise ValueError(f"no sample of {dataset!r} could be read" + (f":\n{report()}" if report else ""))
