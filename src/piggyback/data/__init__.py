"""Task data: built-in offline benchmarks, image folders, CSV lists, torchvision and HF sets.

Every item is ``(image, label)``: a float32 ``[3, size, size]`` tensor normalised with the
backbone's `InputSpec`, and an int. Images are kept uint8: image files are decoded when
an item is asked for; images held in memory (the built-in tasks) are resized to the
training size once, when the task is loaded, where a split then fits in
`tasks.RESIZE_ONCE_BYTES` and needs no random crop.

`builtin` holds the offline benchmarks, `sources` opens folders, CSV lists, torchvision
and Hugging Face sets, `tasks` splits them into datasets, and `loaders` batches them.
Integer labels (a CSV's, or those of a dataset without class names) are class indices
below `MAX_CLASSES`, so a stray label cannot ask for a head of millions of classes.

Example:
    >>> from piggyback.backbones import InputSpec
    >>> spec = InputSpec(size=32, mean=(0.5,) * 3, std=(0.5,) * 3)
    >>> task = load_task_data("digits", spec, limit=40)
    >>> task.num_classes, len(task.train), tuple(task.train[0][0].shape)
    (10, 40, (3, 32, 32))
"""

from .builtin import (
    ANIMAL_CLASSES,
    BUILTIN_TASKS,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
)
from .builtin import _read_pickled_array as _read_pickled_array
from .loaders import EpochLoader, make_loader
from .sources import IMAGE_EXTENSIONS, MAX_CLASSES
from .tasks import TaskData, TaskDataset, image_transform, load_task_data, source_path

__all__ = [
    "ANIMAL_CLASSES",
    "BUILTIN_TASKS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "IMAGE_EXTENSIONS",
    "MAX_CLASSES",
    "EpochLoader",
    "TaskData",
    "TaskDataset",
    "image_transform",
    "load_task_data",
    "make_loader",
    "source_path",
]
